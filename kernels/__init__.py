"""Triton kernels of ``hdaf`` (installed as ``hdaf.kernels``; setup.py maps it to ``kernels/``).

Importing this package imports nothing else: ``hdaf.kernels.delta_attention`` (which registers
``hdaf::triton_delta_attention_forward/backward``) is imported lazily by ``hdaf.dispatch`` when
the ``"triton"`` backend is asked for. To run the kernels on CPU tensors, set
``TRITON_INTERPRET=1`` before importing torch / hdaf (``torch._dynamo``, which hdaf loads, imports
``triton.language``, whose own ``@triton.jit`` functions must be created in interpreter mode).
"""
