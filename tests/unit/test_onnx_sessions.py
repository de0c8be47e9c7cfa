"""onnxruntime sessions across fork: a forked child never runs or frees its parent's session."""

from __future__ import annotations

import multiprocessing
import os

import pytest

pytest.importorskip("onnxruntime")

from anonloader import onnx_sessions  # noqa: E402
from anonloader.detect.centerface import CenterFaceDetector, _dynamic_model_bytes, centerface_model_path  # noqa: E402


def _child(session, detector, queue) -> None:
    inherited = detector._session
    fresh = detector.session()  # the detector builds this process's own session
    queue.put((
        onnx_sessions.is_current(session),
        any(s is session for s in onnx_sessions._INHERITED),
        fresh is not inherited and onnx_sessions.is_current(fresh),
    ))


def test_a_forked_child_pins_inherited_sessions_and_builds_its_own():
    session = onnx_sessions.new_session(_dynamic_model_bytes(centerface_model_path()))
    assert onnx_sessions.is_current(session) and not onnx_sessions.is_current(None)
    detector = CenterFaceDetector()
    detector.session()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=_child, args=(session, detector, queue))
    process.start()
    result = queue.get(timeout=120)
    process.join(timeout=120)
    assert process.exitcode == 0
    assert result == (False, True, True)
    assert onnx_sessions._MADE_IN[session] == os.getpid()
