"""The leader's call-timeout job is woken by an answer only when that call is due before the job's next look
(raftpbx/calls.py `CallRecorder.poke`): every look scans all active calls twice, and at 100-200 calls/s an
answer without session timers (due `max_duration` later) used to wake it for nothing on every call. An
answer with an RFC 4028 session expiry sooner than the next look still wakes it at once. Timer C is reset by
moving its deadline (one timer per call); it still fires at the latest deadline."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

from test_proxy import Pbx, ringing_call

from raftpbx.calls import CallRecorder, CallSettings


async def test_poke_wakes_the_job_only_for_a_call_due_before_its_next_look() -> None:
    recorder = CallRecorder(SimpleNamespace(cfg=None, clock=lambda: 1000.0),
                            CallSettings(max_duration=3600.0, interval=30.0))
    recorder._wake = asyncio.Event()
    recorder._wake_at = 1030.0  # the job looks next in 30 s
    recorder.poke(recorder.answer_due(1000.0, None))  # due in an hour
    assert not recorder._wake.is_set()
    recorder.poke(recorder.answer_due(1000.0, 1031.0))  # a session expiry after the next look
    assert not recorder._wake.is_set()
    recorder.poke(recorder.answer_due(1000.0, 1005.0))  # before it: look now
    assert recorder._wake.is_set()
    recorder._wake.clear()
    recorder.poke()  # no due time given: always wakes
    assert recorder._wake.is_set()
    recorder._wake.clear()
    recorder._wake_at = None  # the job is looking right now: a poke makes it look once more
    recorder.poke(recorder.answer_due(1000.0, None))
    assert recorder._wake.is_set()


async def test_a_session_expiry_before_the_next_look_still_ends_the_call_in_time(tmp_path: Path) -> None:
    # The job looks every 30 s; the answer's Session-Expires of 1 s must wake it (BYE to both ends ~1 s later).
    pbx = Pbx(tmp_path, CallSettings(timer_c=200.0, max_duration=3600.0, ring_timeout=600.0, interval=30.0))
    await pbx.start()
    try:
        caller, phone, call_id, invite = await ringing_call(pbx, leads=True)
        phone.answer(invite, 200, tag="p", headers=["Session-Expires: 1;refresher=uac"])
        await caller.response(200, cseq=2)
        bye = await phone.request("BYE", within=5.0)
        assert bye.call_id == call_id
        row = pbx.call(call_id)
        assert row is not None and row["cause"] == "timeout" and row["disposition"] == "answered", row
    finally:
        await pbx.close()


async def test_timer_c_reset_by_provisional_responses_fires_at_the_last_deadline(tmp_path: Path) -> None:
    pbx = Pbx(tmp_path, CallSettings(timer_c=1.0, max_duration=3600.0, ring_timeout=600.0, interval=0.05))
    await pbx.start()
    try:
        caller, phone, call_id, invite = await ringing_call(pbx)
        loop = asyncio.get_running_loop()
        phone.answer(invite, 180, tag="p")
        await caller.response(180, final=False, cseq=2)
        await asyncio.sleep(0.6)  # the test's own clock: a second provisional 0.6 s into Timer C
        phone.answer(invite, 183, tag="p")
        await caller.response(183, final=False, cseq=2)
        reset = loop.time()
        cancel = await phone.request("CANCEL", within=3.0)  # Timer C: the ringing branch is CANCELled
        assert loop.time() - reset >= 0.9, "Timer C fired before its reset deadline"
        assert cancel.call_id == call_id
        phone.answer(cancel, 200, tag="p")
        phone.answer(invite, 487, tag="p")
        final = await caller.response(408, cseq=2, within=3.0)
        assert final.status == 408
    finally:
        await pbx.close()
