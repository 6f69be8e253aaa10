"""Integrations of hdaf delta attention into other libraries' models.

``hdaf.integrations.transformers`` — add delta attention to a pretrained BERT-family encoder
from Hugging Face ``transformers`` (imported on demand; ``transformers`` is optional).
"""
