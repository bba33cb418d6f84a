"""Model calls on the serving thread run in the caller's context (worker/compute.py)."""

from __future__ import annotations

import threading

from core.logs import job_id_var
from worker.compute import MainThreadRunner


async def test_a_model_call_sees_the_callers_job_id() -> None:
    runner = MainThreadRunner()
    serving = threading.Thread(target=runner.serve)  # the worker's main thread, here
    serving.start()
    try:
        token = job_id_var.set("job-42")
        try:
            seen = await runner.run(job_id_var.get)
        finally:
            job_id_var.reset(token)
        assert seen == "job-42"
        assert await runner.run(job_id_var.get) is None
    finally:
        runner.stop()
        serving.join()
