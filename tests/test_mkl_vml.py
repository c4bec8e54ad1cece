"""The warm-up for oneMKL's first-call dispatch race (pipeline/mkl_vml.py, pytorch/pytorch#188792).

The race itself needs fresh processes and luck to show (the parity tests run alone failed in 8 of 19 runs before the
warm-up), so these tests check what makes the warm-up work: every VML op is called once on a single element (no
intra-op parallelism) in both float types, and an entry point calls it.
"""
from __future__ import annotations

import torch

import pipeline.inference as inference
import pipeline.mkl_vml as mkl_vml
from model import CoCosNet
from tests.tiny_translation import tiny_config


def test_every_vml_op_is_called_once_per_float_type_on_one_element(monkeypatch):
    calls = []
    for name in mkl_vml.VML_OPS:
        op = getattr(torch, name)
        record = lambda t, _op=op, _name=name: calls.append((_name, t.dtype, t.numel())) or _op(t)  # noqa: E731
        monkeypatch.setattr(torch, name, record)
    mkl_vml.settle_vml_dispatch()
    expected = {(name, dtype, 1) for name in mkl_vml.VML_OPS for dtype in (torch.float32, torch.float64)}
    assert len(calls) == len(expected) and set(calls) == expected


def test_a_translator_settles_the_dispatch(monkeypatch):
    settled = []
    monkeypatch.setattr(inference, "settle_vml_dispatch", lambda: settled.append(True))
    inference.Translator(CoCosNet(tiny_config(label_nc=1)))
    assert settled == [True]
