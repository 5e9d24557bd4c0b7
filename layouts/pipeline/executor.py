"""The pipeline executor: runs this rank's action list of a Schedule on its stages, with real p2p on ``pp``.

Names follow ``torch.distributed.pipelining``: build a ``PipelineStage`` per stage this rank holds, then a
``PipelineSchedule`` (a schedule name from ``registry.SCHEDULES`` or a ``Schedule`` object), then call
``step`` with the whole batch on the first stage's ranks and the targets on the last stage's::

    stage = PipelineStage(piece, stage_index=pp_rank, num_stages=pp, mesh=mesh)
    pipe = PipelineSchedule(stage, "1f1b", n_microbatches=4, loss_fn=loss_fn, optimizer=opt)
    losses = []
    pipe.step(tokens, target=targets, losses=losses)   # inputs are ignored where not needed
    pipe.timeline                                      # this rank's Events, seconds from the step's start

How it runs the list: each send is posted (``isend``) as its SEND action comes and waited on only at STEP and at
the end of the step (the schedule's semantics: a send does not block). Receives are posted early: once every
shape is known (from the second step on) all of a step's receives are posted at its start, so a peer's data
moves while this rank computes (gloo moves a message only once its receive is posted; with the receive already
there, the sender's isend writes it at once); in the first step, the receives among the next ``RECV_LOOKAHEAD``
actions whose shapes are known, after each run of communication. A receive is waited on right before the compute
action that consumes it (its RECV action may sit earlier: schedules put receives in their link's send order,
which a tag-matched transport does not need), and its Event spans that wait. Ops are posted one by one, not as
``batch_isend_irecv``: on gloo, which does not coalesce, the batch call only adds ~0.1 ms of checks a call (2-rank
probe: 170 us against 77 us for one 32 KiB isend), paid ~40 times a step by an interleaved schedule. Each message
has its own tag (stage boundary, microbatch, kind), so a rank that posts its receives in another order than its
peer's sends still matches them. With a schedule that passes ``validate`` no rank waits on a receive whose send
sits behind a blocking op on the peer (waiting later than the RECV action cannot add a wait on the peer: sends
never block). Microbatch losses are scaled by 1/m (``scale_grads``; a sequence schedule's chunks by their share
of the tokens, ``sequence_chunks.py``), so gradients equal one device's on the whole batch with a mean loss;
gradients accumulate across microbatches in ``.grad``, and STEP runs ``optimizer.step()`` and ``zero_grad()``
(nothing when no optimizer is given: the caller steps). Weights shared across stages have their gradients summed
over the stages holding them right before STEP (``shared.py``). B/W split: ``backward.py``.
"""

from __future__ import annotations

import inspect
import time

from dtensor_plus import point_to_point
from dtensor_plus.renamed import renamed_keywords

from .actions import Action, Event, Kind, Schedule
from .microbatch import (merge_microbatches, merge_sequence_microbatches, split_microbatches,
                         split_sequence_microbatches)
from .sequence_chunks import SequenceSplit
from .shared import SharedWeights
from .stage import PipelineStage

__all__ = ["PipelineSchedule", "pipeline_step", "build_schedule", "TORCH_NAMES", "RECV_LOOKAHEAD"]

RECV_LOOKAHEAD = 8  # in the first step, actions ahead whose receives are posted early, as their shapes become known
_RECVS = (Kind.RECV_F, Kind.RECV_B)

# torch.distributed.pipelining's schedule class names, for people moving code over.
TORCH_NAMES = {"ScheduleGPipe": "gpipe", "Schedule1F1B": "1f1b", "ScheduleInterleaved1F1B": "interleaved_1f1b",
               "ScheduleZBVZeroBubble": "zb_v", "ScheduleDualPipeV": "dualpipe_v", "ScheduleLoopedBFS": "breadth_first"}


@renamed_keywords(num_microbatches="n_microbatches")
def build_schedule(name: str, num_ranks: int, n_microbatches: int, stages_per_rank: int = 1,
                   sequence_chunks: int = 1) -> Schedule:
    """The Schedule named ``name`` (a key of ``registry.SCHEDULES`` or ``SEQUENCE_SCHEDULES``, or torch's class
    name); ``stages_per_rank`` is the looped schedules' v and ignored by the others (V and Chimera placements hold
    two stages per rank); ``sequence_chunks``: the k of the sequence schedules (``n_microbatches`` samples in k
    chunks each: a Schedule of k * n_microbatches units)."""
    from .registry import LOOPED, SCHEDULES
    from .schedules_sequence import SEQUENCE_SCHEDULES

    key = TORCH_NAMES.get(name, name)
    if key in SEQUENCE_SCHEDULES:
        return SEQUENCE_SCHEDULES[key](p=num_ranks, m=n_microbatches, k=sequence_chunks)
    if sequence_chunks != 1:
        raise ValueError(f"schedule {name!r} runs whole microbatches; sequence_chunks={sequence_chunks} goes with "
                         f"{sorted(SEQUENCE_SCHEDULES)}")
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known: {sorted(SCHEDULES) + sorted(SEQUENCE_SCHEDULES)} "
                         f"(or {sorted(TORCH_NAMES)})")
    if key in LOOPED:
        return SCHEDULES[key](p=num_ranks, m=n_microbatches, v=stages_per_rank)
    return SCHEDULES[key](p=num_ranks, m=n_microbatches)


class PipelineSchedule:
    """Run a pipeline schedule over this rank's stages.

    Args:
        stages: the PipelineStage(s) this rank holds (several for interleaved and V schedules).
        schedule: a schedule name (see ``build_schedule``) or a ``Schedule``.
        n_microbatches: microbatches per step (needed with a name; a Schedule carries its own).
        loss_fn: ``loss_fn(output, target) -> scalar`` for one microbatch, on the last stage.
        optimizer: stepped (then zeroed) at the schedule's STEP, after this rank's last W; None: the caller steps.
        scale_grads: backpropagate each microbatch loss times 1/m (a mean loss over the batch); False for sums.
            With sequence chunks, each chunk's mean loss times its share of the batch's tokens (``loss_weights``).
        sequence_chunks: k, with a sequence schedule by name (``seq1f1b``, ``terapipe``): ``n_microbatches``
            samples, each cut along dim 1 into k chunks; the stage modules take ``sequence_chunk=``
            (``sequence_chunks.py``).
    """

    def __init__(self, stages, schedule: str | Schedule, n_microbatches: int | None = None, loss_fn=None, *,
                 optimizer=None, scale_grads: bool = True, sequence_chunks: int = 1):
        stages = [stages] if isinstance(stages, PipelineStage) else list(stages)
        if not stages or not all(isinstance(s, PipelineStage) for s in stages):
            raise TypeError(f"stages must be PipelineStage(s), got {stages!r}")
        self.mesh, self.pp_mesh_dim = stages[0].mesh, stages[0].pp_mesh_dim
        self.pp_rank, num_ranks = self.mesh.get_local_rank(self.pp_mesh_dim), self.mesh.size(self.pp_mesh_dim)
        if isinstance(schedule, str):
            if n_microbatches is None:
                raise ValueError(f"schedule {schedule!r} by name needs n_microbatches")
            schedule = build_schedule(schedule, num_ranks, n_microbatches, len(stages), sequence_chunks)
        elif n_microbatches not in (None, schedule.n_microbatches // schedule.sequence_chunks):
            raise ValueError(f"n_microbatches={n_microbatches} but the schedule has "
                             f"{schedule.n_microbatches // schedule.sequence_chunks}")
        from .validate import validate

        validate(schedule, in_order=False)  # tagged messages: receives need not follow send order
        point_to_point.p2p_group(self.mesh, self.pp_mesh_dim)  # collective on first use: every rank builds its schedule
        self._check_placement(stages, schedule, num_ranks)
        self.shared = SharedWeights(stages, self.mesh, self.pp_mesh_dim)  # collective: checks ties on every rank
        self.schedule, self.loss_fn, self.optimizer, self.scale_grads = schedule, loss_fn, optimizer, scale_grads
        self.stages = {s.stage_index: s for s in stages}
        self.actions = schedule.actions[self.pp_rank]
        self.timeline: list[Event] = []
        self.loss_weights: list[float] = []  # per microbatch, set by step: the weighted losses sum to the batch mean

    def _check_placement(self, stages, schedule: Schedule, num_ranks: int) -> None:
        if schedule.num_ranks != num_ranks:
            raise ValueError(f"schedule {schedule.name!r} is for {schedule.num_ranks} pipeline ranks, the mesh's "
                             f"{self.pp_mesh_dim!r} dim has {num_ranks}")
        if schedule.sequence_chunks > 1:
            _check_sequence_chunks(stages, schedule)
        if any(s.num_pipelines != schedule.num_pipelines for s in stages):
            raise ValueError(f"schedule {schedule.name!r} has {schedule.num_pipelines} pipelines; build every "
                             f"PipelineStage with num_pipelines={schedule.num_pipelines}")
        if any(a.kind in (Kind.B, Kind.W) for a in schedule.actions[self.pp_rank]):
            _check_no_ddp(stages, schedule)
        mine, wanted = sorted(s.stage_index for s in stages), list(schedule.stages_of(self.pp_rank))
        if mine != wanted or any(s.num_stages != schedule.num_stages for s in stages):
            raise ValueError(f"pp rank {self.pp_rank} holds stages {mine} of {stages[0].num_stages}; schedule "
                             f"{schedule.name!r} puts stages {wanted} of {schedule.num_stages} here")

    # -- one step -----------------------------------------------------------------------------------------

    def step(self, *args, target=None, losses: list | None = None, seq_len: int | None = None):
        """One training step over the whole batch. ``args[0]``: the batch (used where a first stage lives);
        ``target``: the targets (used where a last stage lives); ``losses``: filled there with the loss of each
        microbatch ending there, in microbatch order (``loss_weights[mb]`` times each sums to the batch mean).
        ``seq_len``: with sequence chunks, the sequence length on a rank given neither batch nor targets. Returns
        the merged last-stage output on the rank holding every microbatch's (with one pipeline: the last
        stage's), else None."""
        m = self.schedule.n_microbatches
        # the microbatches whose input enters here, and those whose loss is computed here (all, with one pipeline)
        runs = self.schedule.runs
        first = {mb for mb in range(m) for s, stage in self.stages.items() if stage.is_first and runs(s, mb)}
        last = sorted(mb for mb in range(m) for s, stage in self.stages.items() if stage.is_last and runs(s, mb))
        if first and not args:
            raise ValueError("this rank holds a first stage: pass the batch, step(batch, ...)")
        wants_loss = bool(last) and self.loss_fn is not None
        if wants_loss and target is None:
            raise ValueError("this rank holds the last stage and has a loss_fn: pass step(..., target=targets)")
        split = self._sequence_split(args, target, seq_len)
        for stage in self.stages.values():
            stage.begin_sequence_step(split)
        if split is None:
            self._inputs = split_microbatches(args[0], m) if first else None
            self._targets = split_microbatches(target, m) if wants_loss else None
            self.loss_weights = [1.0 / m] * m
        else:
            self._inputs = split_sequence_microbatches(args[0], split.num_samples, split.lengths) if first else None
            self._targets = (split_sequence_microbatches(target, split.num_samples, split.lengths) if wants_loss
                             else None)
            self.loss_weights = [split.loss_weight(u) for u in range(m)]
        self._outputs, self._losses, self._pending_sends = {}, {}, []
        self._early_recvs = {}  # (kind, stage, microbatch) -> the work of a receive posted before its RECV action
        self._unwaited = {}  # (kind, stage, microbatch) -> (work, RECV action) whose RECV action has come: waited at use
        self.early_receives = 0  # how many of this step's receives were posted before their RECV action
        # Every shape known (any step after the first): all of the step's receives are posted now, so each send
        # finds its receive waiting and gloo writes the data from the sender's isend (a send that comes first
        # moves only once the receiver's notice wakes the sender's transport thread, which a busy core delays).
        self._shapes_known = all(self._recv_meta(a) is not None for a in self.actions if a.kind in _RECVS)
        self.timeline, self._t0 = [], time.perf_counter()
        self._post_ahead(0, None if self._shapes_known else RECV_LOOKAHEAD)
        i = 0
        while i < len(self.actions):
            j = i
            while j < len(self.actions) and self.actions[j].kind.is_comm:
                j += 1
            if j > i:
                self._communicate(self.actions[i:j], j)
                i = j
            else:
                self._compute(self.actions[i])
                i += 1
        self._wait_sends()
        if not any(a.kind is Kind.STEP for a in self.actions):  # a schedule without STEP: sum before returning
            self.shared.sum_gradients()
        for stage in self.stages.values():
            stage.check_idle()
        if losses is not None and wants_loss:
            losses.extend(self._losses[mb] for mb in last)
        if len(last) == m:  # every microbatch's output is here (one pipeline: the last stage's rank)
            outputs = [self._outputs[mb] for mb in range(m)]
            return merge_microbatches(outputs) if split is None else merge_sequence_microbatches(outputs, split.num_chunks)
        return None

    def _sequence_split(self, args, target, seq_len: int | None) -> SequenceSplit | None:
        """This step's cut into sequence chunks (None for whole microbatches): the sequence length from the batch,
        the targets or ``seq_len``, whichever this rank has (every rank needs it: chunks' shapes cross stages)."""
        k = self.schedule.sequence_chunks
        if k == 1:
            return None
        known = {t.shape[1] for t in (args[0] if args else None, target) if t is not None and t.ndim >= 2}
        if seq_len is not None:
            known.add(seq_len)
        if len(known) != 1:
            raise ValueError(f"schedule {self.schedule.name!r} cuts the sequence into {k} chunks and needs its length on "
                             f"every rank: {'got ' + str(sorted(known)) if known else 'pass'} step(..., seq_len=T) "
                             "(or the batch / targets of shape (B, T, ...))")
        return SequenceSplit(self.schedule.n_microbatches // k, k, known.pop())

    def _record(self, action: Action, start: float, cpu_start: float | None = None) -> None:
        cpu = None if cpu_start is None else time.thread_time() - cpu_start
        self.timeline.append(Event(self.pp_rank, action, start - self._t0, time.perf_counter() - self._t0, cpu))

    def _compute(self, a: Action) -> None:
        if a.kind is Kind.STEP:
            self._wait_sends()  # idle, not STEP's work: the peers are still receiving the last messages
            start, cpu_start = time.perf_counter(), time.thread_time()
            self.shared.sum_gradients()  # after this rank's last backward, before its optimizer reads them
            if self.optimizer is not None:
                self.optimizer.step()
                self.optimizer.zero_grad()
            self._record(a, start, cpu_start)
            return
        stage, mb = self.stages[a.stage], a.microbatch
        self._wait_recv(Kind.RECV_F if a.kind is Kind.F else Kind.RECV_B, a.stage, mb)
        start, cpu_start = time.perf_counter(), time.thread_time()
        if a.kind is Kind.F:
            if stage.is_first:
                stage.set_input(mb, self._inputs[mb])
            target = self._targets[mb] if stage.is_last and self._targets is not None else None
            out, loss = stage.forward_one(mb, self.loss_fn, target, self.loss_weights[mb] if self.scale_grads else 1.0)
            if stage.is_last:
                self._outputs[mb] = out
                if loss is not None:
                    self._losses[mb] = loss
            elif a.stage + 1 in self.stages:  # the next stage is here too (the turn of a V)
                stage.pass_forward_to(self.stages[a.stage + 1], mb)
        elif a.kind in (Kind.BW, Kind.B):
            stage.backward_one(mb) if a.kind is Kind.BW else stage.backward_input(mb)
            if not stage.is_first and a.stage - 1 in self.stages:
                stage.pass_backward_to(self.stages[a.stage - 1], mb)
        elif a.kind is Kind.W:
            stage.backward_weight(mb)
        self._record(a, start, cpu_start)

    def _communicate(self, run, end: int) -> None:
        """Post a run of consecutive communication actions (``end``: the index after it): its sends, and its
        receives not posted yet (the first step: after the header of a boundary's first message, waited here
        since the buffers take its shape), then the receives just ahead. No data receive is waited on here."""
        start = time.perf_counter()
        where = self.schedule.stage_to_rank
        sends, headers, recvs = [], {}, []
        for a in run:
            stage, mb = self.stages[a.stage], a.microbatch
            if a.kind is Kind.SEND_F:
                sends += stage.forward_sends(mb, where[a.stage + 1])
            elif a.kind is Kind.SEND_B:
                sends += stage.backward_sends(mb, where[a.stage - 1])
            elif (a.kind, a.stage, mb) not in self._early_recvs:
                recvs.append(a)
                if a.kind is Kind.RECV_F:
                    header = stage.header_recv(where[a.stage - 1])
                    if header is not None and a.stage not in headers:
                        headers[a.stage] = header
        send_works = self._post(sends, [])[0]
        self._pending_sends.append((send_works, sends))  # the buffers stay alive until the sends complete
        if headers:  # the first microbatch through a boundary: its spec first, then buffers of that shape
            for work in self._post([], list(headers.values()))[1]:
                work.wait()
            for s, (buf, peer, _) in headers.items():
                self.stages[s].read_header(buf, peer)
        for a in recvs:
            self._early_recvs[(a.kind, a.stage, a.microbatch)] = self._post([], [self._recv_op(a)])[1][0]
        if not self._shapes_known:  # the first step: a window ahead, as the shapes become known
            self._post_ahead(end, RECV_LOOKAHEAD)
        for a in run:
            if a.kind in _RECVS:  # its Event is recorded when its consumer waits on it
                self._unwaited[(a.kind, a.stage, a.microbatch)] = (self._early_recvs.pop((a.kind, a.stage, a.microbatch)), a)
            else:
                self._record(a, start)

    def _wait_recv(self, kind: Kind, stage: int, microbatch: int) -> None:
        """Before a compute action: wait on the receive it consumes, if any (its RECV action has come by now:
        ``validate`` puts every RECV before its consumer), and record the RECV's Event over the wait."""
        pending = self._unwaited.pop((kind, stage, microbatch), None)
        if pending is None:
            return
        work, a = pending
        start = time.perf_counter()
        work.wait()
        if kind is Kind.RECV_F:
            self.stages[stage].finish_forward_recv(microbatch)
        self._record(a, start)

    def _recv_op(self, a: Action):
        where, stage = self.schedule.stage_to_rank, self.stages[a.stage]
        if a.kind is Kind.RECV_F:
            return stage.forward_recv(a.microbatch, where[a.stage - 1])
        return stage.backward_recv(a.microbatch, where[a.stage + 1])

    def _post(self, sends, recvs):
        """Post each ``(tensor, peer, tag)`` on the pp point-to-point group: (send works, receive works), one per op."""
        send, recv = point_to_point.send_recv(sends, recvs, self.mesh, self.pp_mesh_dim)
        return send.works, recv.works

    def _recv_meta(self, a: Action):
        """The spec of what ``a`` (a RECV) receives, None while unknown (before the first message of its boundary)."""
        stage = self.stages[a.stage]
        return stage.input_meta if a.kind is Kind.RECV_F else stage.output_meta

    def _post_ahead(self, index: int, lookahead: int | None) -> None:
        """Post the receives among the actions from ``index`` on (``lookahead`` of them; None: all) whose buffer shape
        is known, each as its own op, waited on before the compute action that consumes it."""
        stop = len(self.actions) if lookahead is None else index + lookahead
        for a in self.actions[index:stop]:
            if a.kind not in _RECVS or (a.kind, a.stage, a.microbatch) in self._early_recvs:
                continue
            if (a.kind, a.stage, a.microbatch) in self._unwaited or self._recv_meta(a) is None:
                continue
            self._early_recvs[(a.kind, a.stage, a.microbatch)] = self._post([], [self._recv_op(a)])[1][0]
            self.early_receives += 1

    def _wait_sends(self) -> None:
        for works, _ in self._pending_sends:
            for work in works:
                work.wait()
        self._pending_sends = []


def _check_no_ddp(stages, schedule: Schedule) -> None:
    """W adds a plain parameter's gradient into ``.grad`` itself (``backward.py``), which runs the hooks on the
    tensor but not those registered on its AccumulateGrad node, where torch's DDP reducer puts its own. Told by
    its class, not imported: the library never imports PyTorch's own parallel stack."""
    for stage in stages:
        if any(_is_torch_ddp(type(m)) for m in stage.submodule.modules()):
            raise ValueError(f"stage {stage.stage_index} holds a torch DistributedDataParallel module; schedule "
                             f"{schedule.name!r} splits its backward into B and W, whose weight gradients DDP's "
                             "reducer would not see: lay the stage out with dtensor_plus.layouts.replicate instead")


def _is_torch_ddp(cls: type) -> bool:
    return any(c.__name__ == "DistributedDataParallel" and c.__module__.startswith("torch.nn.parallel")
               for c in cls.__mro__)


def _check_sequence_chunks(stages, schedule: Schedule) -> None:
    """What running sequence chunks needs: the fused backward, and stage modules that take ``sequence_chunk=``."""
    split = sorted({a.kind.value for acts in schedule.actions for a in acts if a.kind in (Kind.B, Kind.W)})
    if split:
        raise ValueError(f"schedule {schedule.name!r} cuts samples into {schedule.sequence_chunks} sequence chunks "
                         f"and splits backwards into {split}: a chunk's keys and values take their later chunks' "
                         "gradient only in a fused BW (sequence_chunks.py); use BW actions (seq1f1b, terapipe)")
    for stage in stages:
        params = inspect.signature(stage.submodule.forward).parameters.values()
        if not any(p.name == "sequence_chunk" or p.kind is p.VAR_KEYWORD for p in params):
            raise TypeError(f"stage {stage.stage_index}: {type(stage.submodule).__name__}.forward takes no "
                            f"sequence_chunk= argument; schedule {schedule.name!r} runs sequence chunks, whose "
                            "attention reads the earlier chunks' keys and values (see sequence_chunks.py)")


def pipeline_step(schedule, stages, inputs=None, targets=None, loss_fn=None, optimizer=None, *,
                  n_microbatches: int | None = None, losses: list | None = None, scale_grads: bool = True,
                  sequence_chunks: int = 1):
    """One step in one call: ``PipelineSchedule(stages, schedule, ...).step(inputs, target=targets, losses=losses)``.
    Returns (merged last-stage output or None, this rank's timeline)."""
    pipe = PipelineSchedule(stages, schedule, n_microbatches, loss_fn, optimizer=optimizer, scale_grads=scale_grads,
                            sequence_chunks=sequence_chunks)
    output = pipe.step(*(() if inputs is None else (inputs,)), target=targets, losses=losses)
    return output, pipe.timeline
