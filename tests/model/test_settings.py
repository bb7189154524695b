"""fastpeft.settings: the FASTPEFT_* switches are read and validated once, in one place."""
import os
import re

import pytest

from fastpeft import settings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_from_environ_parses_and_validates():
    s = settings.from_environ({"FASTPEFT_BACKEND": " Reference ", "FASTPEFT_NF4_GEMM": "fused",
                               "FASTPEFT_NF4_FUSED_MAX_M": "48", "FASTPEFT_CSRC": "0", "FASTPEFT_CSRC_CACHE": "/tmp/c",
                               "TRITON_INTERPRET": "1"})
    assert (s.backend, s.nf4_gemm, s.nf4_fused_max_m, s.csrc, s.csrc_cache, s.triton_interpret) == (
        "reference", "fused", 48, False, "/tmp/c", True)
    assert settings.from_environ({}) == settings.Settings()  # unset -> defaults
    assert settings.from_environ({"FASTPEFT_BACKEND": ""}).backend == "auto"  # empty = unset
    for env, allowed in (({"FASTPEFT_BACKEND": "cuda"}, "auto, cpp, triton, reference"),
                         ({"FASTPEFT_NF4_GEMM": "cublas"}, "auto, fused, buffer"),
                         ({"FASTPEFT_CSRC": "true"}, "1 or 0"),
                         ({"FASTPEFT_NF4_FUSED_MAX_M": "-1"}, ">= 0"),
                         ({"FASTPEFT_NF4_FUSED_MAX_M": "x"}, "integer")):
        with pytest.raises(ValueError, match=re.escape(allowed)) as err:
            settings.from_environ(env)
        assert next(iter(env)) in str(err.value)


def test_override_is_validated_and_restored():
    before = settings.get()
    with settings.override(nf4_gemm="buffer", nf4_fused_max_m=8) as s:
        assert settings.get() is s and s.nf4_gemm == "buffer" and s.nf4_fused_max_m == 8
    assert settings.get() is before
    with pytest.raises(ValueError, match="FASTPEFT_BACKEND"):
        with settings.override(backend="gpu"):
            pass
    with pytest.raises(TypeError, match="unknown settings"):
        with settings.override(lora_gemm="triton"):
            pass
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        with settings.override(triton_interpret=not before.triton_interpret):
            pass
    assert settings.get() is before


def test_environment_changes_after_import_change_nothing_until_reload(monkeypatch):
    before = settings.get()
    monkeypatch.setenv("FASTPEFT_NF4_GEMM", "buffer")
    assert settings.get() is before  # no os.environ read on any path after import
    try:
        assert settings.reload().nf4_gemm == "buffer"
        assert settings.get().triton_interpret == before.triton_interpret
    finally:
        monkeypatch.delenv("FASTPEFT_NF4_GEMM")
        settings.reload()
    assert settings.get().nf4_gemm == before.nf4_gemm


def test_only_the_settings_module_reads_the_environment():
    """One home per concern: no other module of the package reads os.environ / os.getenv."""
    readers = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "fastpeft")):
        for f in files:
            path = os.path.join(dirpath, f)
            if not f.endswith(".py") or path.endswith(os.path.join("fastpeft", "settings.py")):
                continue
            if os.sep + "bench" in path:  # the benchmark harness reads its own command-line environment
                continue
            text = open(path).read()
            if "os.environ" in text or "os.getenv" in text:
                readers.append(os.path.relpath(path, ROOT))
    assert readers == []
