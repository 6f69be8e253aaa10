"""The top-level ``kernels/`` folder must never shadow a third-party package named ``kernels``.

Hugging Face's ``kernels`` (required by transformers >= 5.25) is a top-level package of that name.
Whenever the repository root is on ``sys.path`` (``python -m pytest`` / ``python -m hdaf`` from
the root, setuptools' legacy backend while it writes metadata) a regular package in ``kernels/``
would win over it. ``kernels/`` therefore has no ``__init__.py`` (a namespace portion always loses
to a regular package), and ``hdaf/kernels`` links to it. Each check runs in a fresh interpreter
started from the repository root, so the root is ``sys.path[0]`` exactly as for a user.
"""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_from_root(code, extra_path=None):
    """Run ``python -c code`` with the repository root as the working directory (so it is
    ``sys.path[0]``); ``extra_path`` goes on PYTHONPATH after it, like a site folder."""
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([extra_path] + (
            [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["HF_HUB_OFFLINE"] = "1"
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res.stdout


def test_kernels_folder_is_not_a_regular_package():
    """The cause itself, with a message that says what to do instead."""
    assert not os.path.exists(os.path.join(REPO, "kernels", "__init__.py")), (
        "kernels/__init__.py makes the repository's kernels/ folder a regular package that shadows "
        "Hugging Face's `kernels` whenever the repository root is on sys.path; see kernels/README.md")


def test_a_package_named_kernels_elsewhere_wins_from_the_root(tmp_path):
    """Any installed package named ``kernels`` is imported, not the repository's folder, even
    though the root comes first on sys.path. Runs without the real package installed: a stand-in
    regular package on PYTHONPATH plays its part."""
    site = tmp_path / "site"
    (site / "kernels" / "_internals").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("MARKER = 'third-party'\n")
    (site / "kernels" / "_internals" / "__init__.py").write_text("")
    (site / "kernels" / "_internals" / "locking.py").write_text("def write_egg_lockfile(*a): pass\n")
    out = _run_from_root("""
        import os, sys
        assert os.path.realpath(sys.path[0] or os.getcwd()) == os.path.realpath(os.getcwd())
        import kernels
        print(kernels.__file__)
        assert kernels.MARKER == 'third-party', kernels.__file__
        # what setuptools' egg_info.writers entry point of Hugging Face's kernels loads
        from kernels._internals.locking import write_egg_lockfile
        """, extra_path=str(site))
    assert os.path.realpath(out.strip()).startswith(os.path.realpath(str(site)))


def test_hdaf_kernels_is_the_kernels_folder():
    """``hdaf.kernels`` stays importable and is the top-level folder's code (through the link)."""
    out = _run_from_root("""
        import importlib.util
        spec = importlib.util.find_spec('hdaf.kernels.delta_attention')
        print(spec.origin)
        """)
    assert os.path.realpath(out.strip()) == os.path.realpath(
        os.path.join(REPO, "kernels", "delta_attention.py"))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is not installed")
def test_installed_kernels_and_transformers_hub_kernels_import_from_the_root():
    """With the real packages: transformers' hub-kernels integration imports from the root, and
    where Hugging Face's ``kernels`` is installed (transformers >= 5.25 requires it), ``import
    kernels`` is that package, not the repository's folder."""
    out = _run_from_root("""
        import importlib.metadata
        import transformers.integrations.hub_kernels  # ImportError when kernels/ shadows it
        try:
            importlib.metadata.distribution('kernels')
        except importlib.metadata.PackageNotFoundError:
            print('not installed')
        else:
            import kernels
            print(kernels.__file__)
        """)
    origin = out.strip().splitlines()[-1]
    if origin != "not installed":
        assert origin != "None", "`kernels` resolved to the repository's folder (a namespace)"
        assert not os.path.realpath(origin).startswith(os.path.realpath(REPO) + os.sep), origin
