"""Runs over several machines from the queue (`num_machines: M`, with Redis): gang scheduling.

A run that needs M machines starts only when M workers each hold what it needs (a CPU slot, or
`num_processes` GPUs): none of its processes then waits in a collective for a machine that never comes.

1. The worker that takes the run's queue task puts it on the board (`cherry:gang:<id>` in Redis, ordered as
   the queue is: priority, then submission) and goes on with its other tasks.
2. Every worker reads the board and the live workers about once a second and makes one decision, `plan` (a
   pure function): in board order, each run gets the free workers that can take it until it has M. A run that
   cannot be filled yet keeps the workers that could take it (they wait for it rather than join a run behind
   it), so a large run is never starved by smaller ones and two runs never each hold half of the machines
   both need. A run that fewer than M live workers could ever take holds nobody, and says why.
3. A worker the plan gives a run takes its slot and joins it (one atomic script: never more than M members);
   one the plan no longer gives it (the run became impossible) leaves and frees its slot.
4. When the run has M members, machine 0 (the member on the host that holds the run's checkpoint, if one
   does, else the first to join) publishes the rendezvous, its address and a free port, and moves the run to
   running; every member then starts `python -m jobs.child RUN_ID PID --machine K --rendezvous HOST:PORT`,
   whose `engine.launch.launch` starts that machine's processes.

Losing a machine ends the run on every machine: a member's run process that is told to stop (its worker was
killed or stops) marks the run's gang lost before it ends; machine 0's worker marks it lost when a member's
worker stops beating; machine 0's run then ends `interrupted` (its stop check reads the mark, or its
processes fail in a collective the lost machine left, or its worker kills it after --grace), naming the
machine. Losing machine 0 is an ordinary lost run (no heartbeat: any worker marks it interrupted), and the
other members stop their processes once the run is no longer running.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

GANG_PREFIX = "cherry:gang:"
BOARD = "cherry:gangs"  # run ids on the board, scored in queue order
STALE_READY_SECONDS = 60.0  # a started entry this old whose run is queued again belongs to an earlier attempt

# Join gang KEYS[1] as member ARGV[2] (JSON) under worker id ARGV[1], while it gathers and has fewer than its
# machines; returns the member count after (0: not joined).
JOIN_LUA = """
if redis.call('HGET', KEYS[1], 'state') ~= 'gathering' then return 0 end
local members = cjson.decode(redis.call('HGET', KEYS[1], 'members'))
for _, m in ipairs(members) do
  if m['worker'] == ARGV[1] then return #members end
end
if #members >= tonumber(redis.call('HGET', KEYS[1], 'machines')) then return 0 end
table.insert(members, cjson.decode(ARGV[2]))
redis.call('HSET', KEYS[1], 'members', cjson.encode(members))
return #members
"""

# Leave gang KEYS[1] (worker ARGV[1]) while it gathers; returns 1 when it left.
LEAVE_LUA = """
if redis.call('HGET', KEYS[1], 'state') ~= 'gathering' then return 0 end
local members = cjson.decode(redis.call('HGET', KEYS[1], 'members'))
local kept = {}
for _, m in ipairs(members) do
  if m['worker'] ~= ARGV[1] then table.insert(kept, m) end
end
if #kept == #members then return 0 end
redis.call('HSET', KEYS[1], 'members', #kept > 0 and cjson.encode(kept) or '[]')
return 1
"""

# Start gang KEYS[1]: from gathering with all its machines to ready, its members in machine order ARGV[1]
# (the same workers), its rendezvous ARGV[2] and the time ARGV[3]; returns 1 when it started.
START_LUA = """
if redis.call('HGET', KEYS[1], 'state') ~= 'gathering' then return 0 end
local members = cjson.decode(redis.call('HGET', KEYS[1], 'members'))
if #members ~= tonumber(redis.call('HGET', KEYS[1], 'machines')) then return 0 end
redis.call('HSET', KEYS[1], 'state', 'ready', 'members', ARGV[1], 'rendezvous', ARGV[2], 'ready_at', ARGV[3])
return 1
"""


# ------------------------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Room:
    """A live worker as the decision sees it: what it has in all and what is free now."""

    id: str
    host: str
    gpus: bool  # a GPU worker: a run takes num_processes of its GPUs on it; else one CPU slot
    units: int  # its GPUs, or its CPU slots
    free: int  # of those, free now

    def need(self, processes: int) -> int:
        return processes if self.gpus else 1


@dataclass(frozen=True)
class Gang:
    """A run on the board: it needs `machines` workers, `processes` processes on each."""

    run_id: str
    machines: int
    processes: int
    members: tuple[str, ...] = ()  # the workers that joined it, in join order
    host: str | None = None  # machine 0 must be on this host: the run's checkpoint is on its disk


@dataclass
class Plan:
    take: dict[str, list[str]] = field(default_factory=dict)  # run id -> the workers that take it
    waiting: dict[str, str] = field(default_factory=dict)  # run id -> why it has not started


def plan(gangs: list[Gang], workers: list[Room]) -> Plan:
    """Which live workers take which run on the board (`gangs` in board order), and why each run that is not
    full waits. A worker takes part in one gathering run at a time; its members stay in it."""
    result = Plan()
    live = {w.id: w for w in workers}
    spoken_for: set[str] = set()  # taken by, or waiting for, a run earlier on the board
    for gang in gangs:
        able = [w for w in workers if w.units >= w.need(gang.processes)]
        reason = _impossible(gang, workers, able)
        if reason:  # it could not start even with every worker free: it holds nobody
            result.waiting[gang.run_id] = reason
            continue
        chosen = [live[m] for m in gang.members if m in live]
        # the checkpoint's host first: machine 0 must be there, so others join only once it did
        for w in sorted(able, key=lambda w: (w.host != gang.host, w.id)):
            if len(chosen) >= gang.machines:
                break
            if w in chosen or w.id in spoken_for or w.free < w.need(gang.processes):
                continue
            if gang.host and w.host != gang.host and not any(c.host == gang.host for c in chosen):
                continue
            chosen.append(w)
        result.take[gang.run_id] = [w.id for w in chosen]
        spoken_for |= {w.id for w in chosen}
        if len(chosen) < gang.machines:
            spoken_for |= {w.id for w in able}  # they wait for this run rather than join one behind it
            joined = ", ".join(w.id for w in chosen) or "none yet"
            result.waiting[gang.run_id] = (
                f"waiting for {gang.machines - len(chosen)} more of {gang.machines} machines "
                f"(joined: {joined}); the workers that can take it are busy"
                + (f", and machine 0 must be on {gang.host} (its checkpoint)" if gang.host else "")
            )
    return result


def _impossible(gang: Gang, workers: list[Room], able: list[Room]) -> str | None:
    """Why no set of the live workers could take `gang`, even all free; None when some could."""
    unit = "GPUs" if any(w.gpus for w in workers) else "slot(s)"
    if len(able) < gang.machines:
        return (
            f"waiting for {gang.machines} workers (num_machines={gang.machines}); {len(workers)} live, "
            f"{len(able)} of them can take it ({gang.processes} processes each, one CPU slot or {gang.processes} "
            f"{unit}): start more `cherry worker`s on this Redis, or resubmit with fewer num_machines"
        )
    if gang.host and not any(w.host == gang.host for w in able):
        return (
            f"waiting for a worker on {gang.host}, which holds the run's checkpoint (machine 0 resumes it); "
            "start one there, or set CHERRY_ARTIFACTS to a directory every machine sees"
        )
    return None


def machine_order(members: list[dict[str, Any]], host: str | None) -> list[dict[str, Any]]:
    """The members in machine-rank order: join order, except that the first member on `host` (the host
    holding the run's checkpoint) is machine 0."""
    first = next((m for m in members if host and m["host"] == host), None)
    return ([first] if first else []) + [m for m in members if m is not first]


def board_order(priority: int, created_at: float) -> float:
    """A run's place on the board: higher priority first, then the earlier submission."""
    return -priority * 1e10 + created_at


def rendezvous_host() -> str:
    """The address other machines reach this one at: $CHERRY_ADDRESS, else the hostname."""
    return os.environ.get("CHERRY_ADDRESS") or socket.gethostname()


# ------------------------------------------------------------------------------------------- the board


@dataclass
class Entry:
    """One run on the board, as Redis holds it."""

    run_id: str
    machines: int
    processes: int
    host: str | None
    state: str  # gathering | ready
    members: list[dict[str, Any]]  # {worker, host, gpus}, in join order (machine order once ready)
    rendezvous: str | None
    lost: str | None  # why the run lost a machine, once it did
    ready_at: float  # when it started (0 while it gathers)

    def gang(self) -> Gang:
        return Gang(self.run_id, self.machines, self.processes, tuple(m["worker"] for m in self.members), self.host)

    def rank_of(self, worker_id: str) -> int | None:
        return next((k for k, m in enumerate(self.members) if m["worker"] == worker_id), None)


class Board:
    """The runs waiting for (or running on) several machines, in the shared Redis."""

    def __init__(self, state) -> None:
        self.r = state.r
        self._join = self.r.register_script(JOIN_LUA)
        self._leave = self.r.register_script(LEAVE_LUA)
        self._start = self.r.register_script(START_LUA)

    @staticmethod
    def key(run_id: str) -> str:
        return GANG_PREFIX + run_id

    def post(self, run_id: str, machines: int, processes: int, host: str | None, order: float) -> None:
        """Put a queued run on the board. A task taken twice keeps the members it gathered; the entry of an
        earlier attempt (a resumed run whose machine 0 was lost) is replaced."""
        old = self.get(run_id)
        if old is not None and (old.state == "gathering" or time.time() - old.ready_at < STALE_READY_SECONDS):
            return
        fields = {"machines": machines, "processes": processes, "host": host or "", "state": "gathering"}
        pipe = self.r.pipeline()
        pipe.delete(self.key(run_id))
        pipe.hset(self.key(run_id), mapping={**fields, "members": "[]"})
        pipe.zadd(BOARD, {run_id: order})
        pipe.execute()

    def has(self, run_id: str) -> bool:
        return bool(self.r.exists(self.key(run_id)))

    def entries(self) -> list[Entry]:
        ids = self.r.zrange(BOARD, 0, -1)
        pipe = self.r.pipeline(transaction=False)
        for run_id in ids:
            pipe.hgetall(self.key(run_id))
        found = []
        for run_id, raw in zip(ids, pipe.execute()):
            if raw and "state" in raw:
                found.append(_entry(run_id, raw))
            else:
                self.r.zrem(BOARD, run_id)  # half-written or dropped meanwhile
        return found

    def get(self, run_id: str) -> Entry | None:
        raw = self.r.hgetall(self.key(run_id))
        return _entry(run_id, raw) if raw and "state" in raw else None

    def join(self, run_id: str, worker_id: str, host: str, gpus: str | None) -> int:
        member = json.dumps({"worker": worker_id, "host": host, "gpus": gpus})
        return int(self._join(keys=[self.key(run_id)], args=[worker_id, member]))

    def leave(self, run_id: str, worker_id: str) -> bool:
        return bool(self._leave(keys=[self.key(run_id)], args=[worker_id]))

    def start(self, run_id: str, members: list[dict[str, Any]], rendezvous: str) -> bool:
        args = [json.dumps(members), rendezvous, repr(time.time())]
        return bool(self._start(keys=[self.key(run_id)], args=args))

    def mark_lost(self, run_id: str, reason: str) -> None:
        """Record (the first) reason the run lost a machine; its machine 0 ends it interrupted."""
        if self.r.exists(self.key(run_id)):
            self.r.hsetnx(self.key(run_id), "lost", reason)

    def drop(self, run_id: str) -> None:
        pipe = self.r.pipeline()
        pipe.delete(self.key(run_id))
        pipe.zrem(BOARD, run_id)
        pipe.execute()


def _entry(run_id: str, raw: dict[str, str]) -> Entry:
    return Entry(
        run_id=run_id,
        machines=int(raw.get("machines") or 1),
        processes=int(raw.get("processes") or 1),
        host=raw.get("host") or None,
        state=raw["state"],
        members=json.loads(raw.get("members") or "[]"),
        rendezvous=raw.get("rendezvous") or None,
        lost=raw.get("lost") or None,
        ready_at=float(raw.get("ready_at") or 0),
    )


def lost_machine(entry: Entry | None, live_workers: set[str]) -> str | None:
    """Why a started run lost a machine: the reason marked on the board, or a member whose worker no
    longer beats. None while every machine is there."""
    if entry is None:
        return None
    if entry.lost:
        return entry.lost
    for rank, member in enumerate(entry.members):
        if member["worker"] not in live_workers:
            return f"machine {rank} ({member['host']}) was lost: its worker {member['worker']} stopped beating"
    return None


def machines_field(members: list[dict[str, Any]]) -> str:
    """The run row's `machines`: each machine's host, worker and GPUs, by machine rank."""
    return json.dumps([{"host": m["host"], "worker": m["worker"], "gpus": m.get("gpus")} for m in members])
