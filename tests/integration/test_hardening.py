"""Regressions of the server hardening: control never waits behind generation, abandoned work stops, labels bounded.

Each test runs against a real uvicorn with the engine in this process and in its child process.
Timeouts here detect hangs (they sit far below the waits a hang would cost); they are not speed limits.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from colocate import SamplingParams
from tests.integration.servers import GREEDY, MODES, PROMPT, Served, error_of, num_active, serve

NUM_HELD = 48  # more than the 32 worker threads the engine process used to park held requests on
CONTROL_TIMEOUT_S = 20.0  # far below paused_wait_s=120: a control call that waits behind held requests fails
# A held request answers 503 by paused_wait_s plus a margin, however many are held and while a pause drains.
# The margin covers a burst's own overhead on two busy cores; a wait that grows with the number held (the
# engine process parked them on 32 threads: 96 held took 3 x paused_wait_s) or with the drain goes past it.
SHORT_WAIT_S = 3.0
WAIT_MARGIN_S = 3.5
NUM_BURST = 96
NUM_LONG = 8
LONG_TOKENS = 1500  # 8 of these take ~35 s of engine time on the CPU test machine
STOP_DEADLINE_S = 10.0  # abandoned work must be gone long before it could have finished
LONG_BODIES = {"/generate": {"text": PROMPT, "sampling_params": {"max_new_tokens": LONG_TOKENS, "ignore_eos": True,
                                                                 "temperature": 0.0}},
               "/v1/completions": {"prompt": PROMPT, "max_tokens": LONG_TOKENS, "temperature": 0.0}}


@pytest.fixture(scope="module", params=MODES)
def served(request: pytest.FixtureRequest, checkpoints: tuple[Path, Path]) -> Iterator[Served]:
    with serve(checkpoints[0], request.param) as served:
        yield served


@pytest.fixture
def server(served: Served) -> Iterator[Served]:
    yield served
    served.restore()


async def _until(is_done: Callable[[], Awaitable[bool]], deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not await is_done():
        assert time.monotonic() < deadline, f"{what} within {deadline_s} s"
        await asyncio.sleep(0.05)


async def _num_active(client: httpx.AsyncClient) -> int:
    status = (await client.get("/memory")).json()
    return status["num_running"] + status["num_waiting"]


# -- control never waits behind generation ---------------------------------------------------
def test_control_answers_while_many_requests_are_held(server: Served) -> None:
    """Regression: with the engine in a child process, 32 held requests filled its worker threads and
    /resume, /health and /memory hung until paused_wait_s (5 minutes by default)."""

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=NUM_HELD + 4)
        async with httpx.AsyncClient(base_url=server.url, timeout=CONTROL_TIMEOUT_S * 3, limits=limits) as load, \
                httpx.AsyncClient(base_url=server.url, timeout=CONTROL_TIMEOUT_S) as control:
            assert (await control.post("/pause", json={"mode": "abort"})).status_code == 200
            held = [asyncio.ensure_future(load.post("/generate", json={"text": PROMPT, "sampling_params": GREEDY}))
                    for _ in range(NUM_HELD)]

            async def all_held() -> bool:
                return (await control.get("/memory")).json()["num_waiting"] == NUM_HELD

            await _until(all_held, CONTROL_TIMEOUT_S, f"{NUM_HELD} requests held")
            health = await control.get("/health")
            assert health.status_code == 200 and not health.json()["is_awake"]
            assert (await control.get("/memory")).status_code == 200
            assert (await control.post("/resume")).status_code == 200
            return await asyncio.gather(*held)

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * NUM_HELD
    assert all(r.json()["output_ids"] == server.expected for r in responses)


@pytest.mark.parametrize("mode", MODES)
def test_held_requests_answer_503_by_paused_wait_s(mode: str, checkpoints: tuple[Path, Path]) -> None:
    """Regression: paused_wait_s bounds a held request's wait, however many are held and while a pause
    drains. The engine process queued held requests behind its 32 threads, and a pause draining long
    requests held new ones until the drain ended (with paused_wait_s=1, some 503s came after 12.4 s)."""
    bound_s = SHORT_WAIT_S + WAIT_MARGIN_S

    async def timed_generates(client: httpx.AsyncClient, n: int) -> list[tuple[httpx.Response, float]]:
        async def one() -> tuple[httpx.Response, float]:
            start = time.monotonic()
            r = await client.post("/generate", json={"text": PROMPT, "sampling_params": {"max_new_tokens": 4}})
            return r, time.monotonic() - start
        return await asyncio.gather(*(one() for _ in range(n)))

    async def run(url: str) -> None:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            # Paused: every held request is refused by the bound, with Retry-After.
            assert (await client.post("/pause")).status_code == 200
            answers = await timed_generates(client, NUM_BURST)
            assert {r.status_code for r, _ in answers} == {503}
            assert all(r.headers["Retry-After"] and error_of(r)["code"] == "engine_paused" for r, _ in answers)
            slowest = max(s for _, s in answers)
            assert slowest < bound_s, f"a held request waited {slowest:.1f} s with paused_wait_s={SHORT_WAIT_S}"
            assert (await client.post("/resume")).status_code == 200

            # Draining: a pause(mode="wait") runs long requests to their end; requests that arrive meanwhile
            # are held, and their wait counts from their arrival, not from the end of the drain.
            long_client = httpx.AsyncClient(base_url=url, timeout=120)
            longs = [asyncio.ensure_future(long_client.post("/generate", json=LONG_BODIES["/generate"]))
                     for _ in range(3)]

            async def running() -> bool:
                return await _num_active(client) == 3

            await _until(running, 20, "the long requests running")
            pause = asyncio.ensure_future(client.post("/pause", json={"mode": "wait", "timeout_s": 120}))
            await asyncio.sleep(0.5)  # the pause is draining
            answers = await timed_generates(client, 32)
            statuses = [r.status_code for r, _ in answers]
            assert set(statuses) <= {200, 503} and 503 in statuses, statuses  # 200: arrived before the pause
            slowest = max(s for _, s in answers)
            assert slowest < bound_s, f"a request held by a draining pause waited {slowest:.1f} s"
            assert not pause.done(), "the drain ended early; the test proves nothing"
            for task in longs:  # their clients go away: the drain ends
                task.cancel()
            await asyncio.gather(*longs, return_exceptions=True)
            await long_client.aclose()
            assert (await pause).status_code == 200
            assert (await client.post("/resume")).status_code == 200

    with serve(checkpoints[0], mode, paused_wait_s=SHORT_WAIT_S) as served:
        asyncio.run(run(served.url))


# -- abandoned work stops --------------------------------------------------------------------
@pytest.mark.parametrize("route", sorted(LONG_BODIES))
def test_abandoned_requests_stop(server: Served, route: str) -> None:
    """Regression: a client that disconnected left its request running (after 64 abandoned 1500-token
    requests a fresh 8-token one waited 109 s). Now the engine aborts them within a step."""

    async def start_and_abandon() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=CONTROL_TIMEOUT_S) as control:
            load = httpx.AsyncClient(base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=16))
            tasks = [asyncio.ensure_future(load.post(route, json=LONG_BODIES[route])) for _ in range(NUM_LONG)]

            async def all_started() -> bool:
                return await _num_active(control) == NUM_LONG

            await _until(all_started, CONTROL_TIMEOUT_S, "the long requests running")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await load.aclose()  # the connections close: the server sees its clients go

    asyncio.run(start_and_abandon())
    _assert_engine_idles(server)


def test_python_client_timeout_abandons_its_request(server: Served) -> None:
    """A trainer's Client whose call times out closes its connection, and the server stops that work."""
    from colocate.client import Client

    with Client(server.url, timeout_s=1.0) as client, pytest.raises(httpx.TimeoutException):
        client.generate([PROMPT] * 6, SamplingParams(max_new_tokens=LONG_TOKENS, ignore_eos=True))
    _assert_engine_idles(server)


def _assert_engine_idles(server: Served) -> None:
    with server.client(CONTROL_TIMEOUT_S) as client:
        deadline = time.monotonic() + STOP_DEADLINE_S
        while (n := num_active(client)) != 0:
            assert time.monotonic() < deadline, f"{n} abandoned sequence(s) still in the engine after " \
                                                f"{STOP_DEADLINE_S} s"
            time.sleep(0.05)
        r = client.post("/generate", json={"text": PROMPT, "sampling_params": GREEDY})
        assert r.status_code == 200 and r.json()["output_ids"] == server.expected


# -- metrics ---------------------------------------------------------------------------------
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def _request_series(text: str) -> set[tuple[str, frozenset]]:
    """(metric, labels without `le`) of every request counter and histogram series in a scrape."""
    series = set()
    for line in text.splitlines():
        if line.startswith("colocate_request"):
            name = re.sub(r"_(bucket|count|sum|created)$", "", line.split("{")[0].split(" ")[0])
            series.add((name, frozenset((k, v) for k, v in _LABEL.findall(line) if k != "le")))
    return series


def test_made_up_methods_and_paths_add_no_metric_series(server: Served) -> None:
    """Regression: every made-up HTTP method and path became a label value (+200 series for 100 requests)."""
    with server.client() as client:
        before = _request_series(client.get("/metrics").text)
        for i in range(100):
            r = client.request(f"BREW{i}", f"/teapot/{i}")
            assert r.status_code in (404, 405) and error_of(r)
            assert client.get(f"/made-up-{i}").status_code == 404
        added = _request_series(client.get("/metrics").text) - before
    labels = [dict(labels) for _, labels in added]
    assert {d.get("route") for d in labels} <= {"other", "/metrics"}, labels
    assert {d.get("method") for d in labels} <= {"other", "GET", None}, labels  # None: the histogram
    assert len(added) <= 8, sorted(added)
