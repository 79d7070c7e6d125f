"""StopReadingModel: an RNN classifier that stops reading a text once its answer is confident.

The RNN (the model's own `nn.LSTM` / `nn.GRU`, its own weights) runs stretch by stretch, `every`
tokens at a time through the fused kernel, carrying its state. After each stretch an exit head
reads the last hidden state; samples whose score reaches the exit's threshold leave, and the
next stretch runs on the others alone (gather, run, scatter). A sample whose text ends within a
stretch (the rest is padding) has finished reading there: the original classifier (`tail`)
answers for it from the outputs read so far, exactly as the static model would, since it reads
each text's output at the text's last token. The final exit is the original classifier.

The cost of a sample is what it read: the stretches it ran, the heads it passed, the classifier
if it reached it. Stretches have fixed boundaries (multiples of `every`), so what a sample
spends never depends on the other samples of its batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from dynify.errors import StrategyError
from dynify.frontend.inputs import as_inputs
from dynify.runtime import recurrence
from dynify.runtime.control import cond, full_index, scatter_rows, selected
from dynify.runtime.decisions import (
    NEVER,
    exit_decision,
    gate_open,
    gate_open_one,
    gate_probability,
    leaves_one,
    start_streak,
    straight_through_gumbel,
)
from dynify.runtime.ledger import FIXED, UNIT, CostBook, Tab
from dynify.runtime.model import DynamicModel, ExportFace, PerCallRecord
from dynify.runtime.policy import ExitPolicy, PolicyState
from dynify.train.losses import LossConfig, budget_price, distillation, priced_compute

KD_TEMPERATURE = 3.0  # the exits' own distillation temperature (LossConfig.kd_temperature None)

RnnState = Tensor | tuple[Tensor, Tensor]

JUMP_THRESHOLD = "jump_threshold"  # the decision scalar calibration chooses with the exits
# Its grid: 0 always jumps after a stretch read, NEVER never jumps (the exits alone).
JUMP_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, NEVER)


def run_stretch(rnn: nn.RNNBase, inputs: Tensor, state: RnnState | None) -> tuple[Tensor, RnnState]:
    """Some steps of `inputs` (the RNN's own layout) through the fused kernel of the shared step
    runtime (`dynify.runtime.recurrence`), carrying `state` in the module's own form (None
    before the first step): (outputs [N, steps, H] batch first, state)."""
    start = None
    if isinstance(state, tuple):
        start = recurrence.State(*state)
    elif state is not None:
        start = recurrence.State(state, None)
    out, final = recurrence.run_stretch(rnn, recurrence.batch_first(rnn, inputs), start)
    return out, recurrence.module_output(rnn, out, final)[1]


def state_rows(state: RnnState, index: Tensor) -> RnnState:
    """The state of samples `index` (an RNN state keeps the batch on dim 1)."""
    if isinstance(state, tuple):
        return tuple(s.index_select(1, index) for s in state)  # type: ignore[return-value]
    return state.index_select(1, index)


ENCODE, TAIL = "encode", "tail"  # the book's items of the parts before and after the RNN


def stretch_item(i: int) -> str:
    """The book's item of stretch i (the RNN steps from boundary(i - 1) to boundary(i))."""
    return f"stretch{i}"


def head_item(i: int) -> str:
    """The book's item of exit head i."""
    return f"head{i}"


def jump_item(i: int) -> str:
    """The book's item of jump head i (after exit head i, on the samples that read on)."""
    return f"jump{i}"


def cost_book(
    static_macs: int,
    fixed_macs: int,
    stretch_macs: Sequence[int],
    head_macs: Sequence[int],
    tail_macs: int,
    jump_macs: Sequence[int] = (),
) -> CostBook:
    """The cost book of a stop-reading model: the parts before the RNN and stretch 0 are
    `FIXED` (every sample reads its first stretch); every later stretch, exit head, jump head
    and the original classifier are `UNIT`s, paid by the samples that reach them."""
    book = CostBook(static_macs)
    book.add(ENCODE, fixed_macs, FIXED)
    for i, macs in enumerate(stretch_macs):
        book.add(stretch_item(i), macs, FIXED if i == 0 else UNIT)
        if i < len(head_macs):
            book.add(head_item(i), head_macs[i], UNIT)
        if i < len(jump_macs):
            book.add(jump_item(i), jump_macs[i], UNIT)
    book.add(TAIL, tail_macs, UNIT)
    return book


class JumpHead(nn.Module):
    """LSTM-Jump's jump decision, binary: the logit [N] of reading the next stretch (rather
    than skipping the next `jump` stretches) from the hidden state. Starts at reading on."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.fill_(3.0)

    def forward(self, h: Tensor) -> Tensor:
        return self.linear(h).squeeze(-1)


class StopReadingModel(DynamicModel):
    strategy = "stop-reading"
    takes_extra_input = True
    # RNN steps each sample of this thread's last forward ran (int64 [N])
    last_tokens = PerCallRecord()

    def __init__(
        self,
        *,
        encode: nn.Module,
        rnn: nn.RNNBase,
        tail: nn.Module,
        position: nn.Module | None,  # ReadLengths: steps each sample must read, or None
        heads: Sequence[nn.Module],
        every: int,
        steps: int,
        book: CostBook,
        encode_is_input: bool,
        policy: ExitPolicy,
        thresholds: Sequence[float],
        static_macs: int,
        input_shape: tuple[int, ...],
        num_classes: int,
        jump: int = 0,
        jump_heads: Sequence[nn.Module] = (),
        jump_threshold: float = 0.5,
        budget: float = 0.5,
    ):
        super().__init__(
            static_macs=static_macs,
            input_shape=input_shape,
            num_classes=num_classes,
            thresholds=thresholds,
            book=book,
        )
        self.encode = encode
        self.rnn = rnn
        self.tail = tail
        self.position = position
        self.heads = nn.ModuleList(heads)
        self.every, self.steps = int(every), int(steps)
        self.encode_is_input = encode_is_input
        self.policy = policy
        self.register_buffer("temperatures", torch.ones(len(heads)))
        # The jump head (0: none): after a checkpoint that does not exit, a sample either reads
        # the next stretch or skips the next `jump` stretches, its state carried over.
        self.jump = int(jump)
        self.budget = float(budget)
        if self.jump:
            self.jump_heads = nn.ModuleList(jump_heads)
            self.register_buffer("jump_threshold", torch.tensor(float(jump_threshold)))
            self.register_buffer("budget_multiplier", torch.zeros((), dtype=torch.float64))

    # --- geometry and costs ----------------------------------------------------------------
    @property
    def num_exits(self) -> int:
        """Exit heads, not counting the final classifier."""
        return len(self.heads)

    def boundary(self, i: int) -> int:
        """Tokens read when exit i decides (after stretch i)."""
        return min(self.steps, (i + 1) * self.every)

    def _start(self, i: int) -> int:
        """The first token of stretch i."""
        return 0 if i == 0 else self.boundary(i - 1)

    def set_jump_threshold(self, value: float) -> None:
        """The jump heads' threshold (the gate rule: a sample reads the next stretch when
        p > 1 - threshold; 0 always jumps, above 1 never jumps)."""
        if not self.jump:
            raise StrategyError(
                "This stop-reading model has no jump head; convert with options={'jump': N}."
            )
        value = float(value)
        if not math.isfinite(value) or value < 0.0:
            raise StrategyError(f"The jump threshold must be finite and >= 0, got {value}.")
        self.jump_threshold.fill_(value)

    # --- decision scalars: the jump threshold, chosen by calibration (`DecisionScalars`) ----
    def decision_scalars(self) -> dict[str, tuple[float, ...]]:
        """The jump threshold's calibration grid (none without a jump head): from always
        jumping (0) to never (above 1), so calibration can also drop the jumps."""
        return {JUMP_THRESHOLD: JUMP_GRID} if self.jump else {}

    def scalar_values(self) -> dict[str, float]:
        return {JUMP_THRESHOLD: float(self.jump_threshold)} if self.jump else {}

    def set_scalar(self, name: str, value: float) -> None:
        if name != JUMP_THRESHOLD:
            known = ", ".join(self.decision_scalars()) or "none (no jump head)"
            raise StrategyError(f"stop-reading has no decision scalar '{name}'; it has: {known}.")
        self.set_jump_threshold(value)

    def read_lengths(self, *args: Tensor) -> Tensor:
        """Tokens each sample must read for the original classifier's answer, int64 [N] in
        [1, steps], from the model's inputs: up to the last position the classifier reads
        (its gather index, its padding mask), or every token."""
        if self.position is None:
            return recurrence.full_lengths(args[0].shape[0], self.steps, args[0])
        return self.position(*args)

    def _item_macs(self, name: Callable[[int], str], count: int, device: torch.device) -> Tensor:
        """The book's MACs of items name(0..count-1), float64 [count, 1]."""
        values = [float(self.book.macs(name(i))) for i in range(count)]
        return torch.tensor(values, dtype=torch.float64, device=device)[:, None]

    def _path_costs(
        self, ran: Tensor, decided: Tensor, jumped: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(MACs [K + 1, N] of leaving at each exit, exits open [K, N]) from which stretches
        each sample runs (`ran` bool [K + 1, N]), at which checkpoints it decides an exit
        (`decided` bool [K, N]) and a jump (`jumped`) when no exit takes it: leaving at exit
        i pays the stretches run up to i, the exit heads up to i and the jump heads before i;
        the final answer pays every stretch run, every head passed and the tail."""
        k, device = self.num_exits, ran.device
        stretches = (ran.double() * self._item_macs(stretch_item, k + 1, device)).cumsum(0)
        heads = (decided.double() * self._item_macs(head_item, k, device)).cumsum(0)
        if self.jump:
            assert jumped is not None
            jumps = (jumped.double() * self._item_macs(jump_item, k, device)).cumsum(0)
        else:
            jumps = torch.zeros_like(heads)
        passed_jumps = torch.cat([jumps.new_zeros((1, jumps.shape[1])), jumps[:-1]])
        fixed = float(self.book.macs(ENCODE))
        leave = fixed + stretches[:-1] + heads + passed_jumps
        final = fixed + stretches[-1] + heads[-1] + jumps[-1] + self.book.macs(TAIL)
        return torch.cat([leave, final[None]]).round().long(), decided

    def _reads_alone(self, read: Tensor) -> tuple[Tensor, Tensor]:
        """(ran [K + 1, N], decided [K, N]) without jumps: a sample runs every stretch until
        its text ends, and decides at every checkpoint before that."""
        k = self.num_exits
        starts = torch.tensor([self._start(i) for i in range(k + 1)], device=read.device)
        ran = read[None, :] > starts[:, None]
        return ran, ran[1:]

    def exit_macs(self) -> list[int]:
        """What leaving at exit i costs a text that fills the whole input and reads every
        stretch (the last entry: the original classifier after every token); shorter texts,
        and texts that jump, spend less (`sample_exit_costs`)."""
        return self.book.cumulative(self._stages())

    def _stages(self) -> list[list[str]]:
        """The book's items of stage i: stretch i (after jump head i - 1) and exit head i (the
        last stage: the original classifier)."""
        k, stages = self.num_exits, []
        for i in range(k + 1):
            stage = [ENCODE] if i == 0 else []
            if i and self.jump:
                stage.append(jump_item(i - 1))
            stage += [stretch_item(i), TAIL if i == k else head_item(i)]
            stages.append(stage)
        return stages

    def sample_exit_costs(
        self, x: Tensor | tuple[Tensor, Tensor], extra: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(MACs [K + 1, N] of leaving at each exit, exits open [K, N]) per sample: a text
        that ends before exit i's position has finished reading there, and a sample that
        jumped over stretch i decides nothing after it, so exit i is closed to it; the final
        answer costs only what it read. Jumps depend on the state alone, so a jump model runs
        the reading once (without exits) to know them."""
        args = self.input_args(x, extra)
        if not self.jump:
            return self._path_costs(*self._reads_alone(self.read_lengths(*args)))
        with torch.no_grad():
            trace = self._read_through(args)
        return self._path_costs(trace.ran_t, trace.decided_t, trace.jumped_t)

    def _final_after(self, i: int) -> int:
        """The original classifier's answer for a text that ends within stretch i, having
        read every stretch up to it and passed every head before it."""
        stages = self._stages()
        items = [n for stage in stages[: i + 1] for n in stage if n != head_item(i)]
        return self.book.total(items) + self.book.macs(TAIL)

    def forced_exit_macs(self) -> list[int]:
        """The most a sample can spend with exit i forced (threshold 0, as a MAC cap sets it),
        per exit: leaving there, or, for a text that has finished reading by exit i's position
        (exit i is closed to it), the original classifier's answer after reading up to it. The
        classifier may cost more than the head, so the second can be the dearer. A sample that
        jumped over stretch i leaves at the next stretch it reads, or answers at the end of its
        text, having skipped at least as much as it then reads: never dearer."""
        return [max(leave, self._final_after(i)) for i, leave in enumerate(self.exit_macs()[:-1])]

    def worst_case_macs(self) -> int:
        """Every token read, every head evaluated, the original classifier run."""
        return self.book.worst_case_macs()

    def describe(self) -> list[dict[str, str]]:
        rows = []
        for i, macs in enumerate(self.exit_macs()):
            final = i == self.num_exits
            rows.append(
                {
                    "exit": "final" if final else str(i),
                    "tokens read": f"{self.steps if final else self.boundary(i)}",
                    **self.book.columns(macs, digits=2),
                    "threshold": "" if final else f"{float(self.thresholds[i]):.3f}",
                }
            )
        return rows

    # --- the parts -------------------------------------------------------------------------
    def _encoded(self, args: tuple[Tensor, ...]) -> Tensor:
        """The RNN's input sequence in its own layout."""
        return self.encode(*args)

    def _time_axis(self) -> int:
        return 1 if self.rnn.batch_first else 0

    def _answer(
        self, args: tuple[Tensor, ...], encoded: Tensor, seq: Tensor, state: RnnState
    ) -> Tensor:
        """The original classifier on the outputs read so far (`seq` [N, steps, H] batch
        first; positions not read are zeros, which it does not read, and a skipped stretch
        repeats the last output read, the state carried over it)."""
        if not self.rnn.batch_first:
            seq = seq.transpose(0, 1)
        if self.encode_is_input:
            return self.tail(*args, (seq, state))
        return self.tail(*args, encoded, (seq, state))

    def _stretch(self, encoded: Tensor, i: int, state: RnnState | None) -> tuple[Tensor, RnnState]:
        axis, start = self._time_axis(), self._start(i)
        return run_stretch(self.rnn, encoded.narrow(axis, start, self.boundary(i) - start), state)

    # --- the forward -----------------------------------------------------------------------
    def forward(self, x: Tensor | tuple[Tensor, Tensor], extra: Tensor | None = None) -> Tensor:
        """Logits [N, C]; `extra`: the lengths or padding mask of a model converted with them
        (also accepted as `forward((x, extra))`)."""
        args = self.input_args(x, extra)
        x = args[0]
        if self._static:
            out = self._forward_static(args)
            self.last_exit = torch.full((x.shape[0],), self.num_exits, dtype=torch.long)
            self.record_static(x.shape[0], x.device)
            self.last_tokens = torch.full((x.shape[0],), self.steps, dtype=torch.long)
            return out
        if x.shape[0] == 1 and self.policy.kind != "patience":
            return self._forward_one(args)
        return self._forward_batch(args)

    def _forward_static(self, args: tuple[Tensor, ...]) -> Tensor:
        """The original network: the parts around the RNN and one fused call of it."""
        encoded = self._encoded(args)
        out, state = self.rnn(encoded)
        if self.encode_is_input:
            return self.tail(*args, (out, state))
        return self.tail(*args, encoded, (out, state))

    def _forward_batch(self, args: tuple[Tensor, ...]) -> Tensor:
        x = args[0]
        batch, k = x.shape[0], self.num_exits
        read = self.read_lengths(*args)
        tab = self.open_tab(batch, x.device)
        exit_index = full_index(x, k)
        tokens = torch.zeros(batch, dtype=torch.long, device=x.device)
        run = _Reading(args, self._encoded(args), read, torch.arange(batch, device=x.device))
        run.axis = self._time_axis()
        policy_state = self.policy.start(batch, x.device)
        seq: Tensor | None = None
        output: Tensor | None = None
        for i in range(k + 1):
            start, end = self._start(i), self.boundary(i)
            readers = run.skip == 0
            everyone = not self.jump or bool(readers.all())
            if everyone:
                out, run.state = self._stretch(run.encoded, i, run.state)
                ran = run.rows
            else:
                index = selected(readers)
                enc = run.encoded.index_select(1 - run.axis, index)
                out, new = self._stretch(enc, i, state_rows(run.state, index))
                run.state = scatter_state(run.state, index, new)
                ran = run.rows[index]
            if seq is None:
                seq = out.new_zeros((batch, self.steps, out.shape[-1]))
            seq[ran, start:end] = out
            tokens.index_add_(0, ran, torch.full_like(ran, end - start))
            if i:
                tab.charge_rows(stretch_item(i), ran)
            if everyone:
                run.last = out[:, -1]
            else:
                skipping = ~readers
                seq[run.rows[skipping], start:end] = run.last[skipping][:, None, :]
                last = run.last.clone()
                last[readers] = out[:, -1]
                run.last = last
                run.skip = torch.where(readers, run.skip, run.skip - 1)
            finished = run.read <= end
            if i == k or finished.all():
                logits = self._answer(run.args, run.encoded, seq[run.rows], run.state)
                output = scatter_rows(output, run.rows, logits, batch)
                tab.charge_rows(TAIL, run.rows)
                break
            if finished.any():
                ended = run.subset(finished)
                logits = self._answer(ended.args, ended.encoded, seq[ended.rows], ended.state)
                output = scatter_rows(output, ended.rows, logits, batch)
                tab.charge_rows(TAIL, ended.rows)
                reading = ~finished
                run, readers = run.subset(reading), readers[reading]
                policy_state = policy_state.keep(reading)
            done, logits = self._exits(i, run, policy_state, tab)
            if done.any():
                output = scatter_rows(output, run.rows[done], logits[done], batch)
                exit_index[run.rows[done]] = i
            if self.jump:
                self._jumps(i, run, readers & ~done, tab)
            if done.any():
                if done.all():
                    break
                run, policy_state = run.subset(~done), policy_state.keep(~done)
        assert output is not None
        self.last_exit = exit_index
        self.close_tab(tab)
        self.last_tokens = tokens
        return output

    def _exits(
        self, i: int, run: _Reading, policy_state: PolicyState, tab: Tab
    ) -> tuple[Tensor, Tensor]:
        """Exit head i on the samples still reading (a sample that skipped stretch i decides
        on its carried state): (leave [n], logits [n, C]); charges the head to them."""
        logits = self.heads[i](run.last)
        tab.charge_rows(head_item(i), run.rows)
        done = self.policy.decide(logits, self.temperatures[i], self.thresholds[i], policy_state)
        return done, logits

    def _jumps(self, i: int, run: _Reading, going: Tensor, tab: Tab) -> None:
        """Jump head i on the samples that read stretch i and read on (`going`): those whose
        gate stays closed skip the next `jump` stretches (run.skip); charges the head."""
        if not bool(going.any()):
            return
        index = selected(going)
        logit = self.jump_heads[i](run.last.index_select(0, index))
        tab.charge_rows(jump_item(i), run.rows[index])
        reads_on = gate_open(gate_probability(logit), self.jump_threshold)
        skip = torch.where(reads_on, 0, self.jump)
        run.skip = run.skip.index_copy(0, index, skip.to(run.skip.dtype))

    def _forward_one(self, args: tuple[Tensor, ...]) -> Tensor:
        """One sample: the same decisions as the batch path without its index bookkeeping,
        decided in Python floats (`leaves_one` and `gate_open_one`, whose tie rules defer to
        the tensor rules)."""
        x = args[0]
        k = self.num_exits
        read = int(self.read_lengths(*args)[0])
        encoded = self._encoded(args)
        thresholds = self.thresholds.tolist()
        temperatures = self.temperatures.tolist()
        jump_threshold = float(self.jump_threshold) if self.jump else 0.0
        tab = self.open_tab(1, x.device, scalar=True)
        outs: list[Tensor] = []
        state: RnnState | None = None
        last: Tensor | None = None
        taken, answer, skip, tokens = k, None, 0, 0
        for i in range(k + 1):
            start, end = self._start(i), self.boundary(i)
            ran_here = skip == 0
            if not ran_here:
                assert last is not None
                outs.append(last.expand(1, end - start, last.shape[-1]))
                skip -= 1
            else:
                out, state = self._stretch(encoded, i, state)
                outs.append(out)
                last = out[:, -1:]
                tokens += end - start
                if i:
                    tab.charge(stretch_item(i))
            if read <= end:
                break
            assert last is not None
            logits = self.heads[i](last[:, 0])
            tab.charge(head_item(i))
            kind = self.policy.kind
            if leaves_one(logits, temperatures[i], thresholds[i], kind, self.temperatures[i]):
                taken, answer = i, logits
                break
            if self.jump and ran_here:  # a jump is decided after reading, never within one
                tab.charge(jump_item(i))
                logit = float(self.jump_heads[i](last[:, 0]))
                if not gate_open_one(logit, jump_threshold):
                    skip = self.jump
        if answer is None:
            seq = torch.cat(outs, 1)
            rest = self.steps - seq.shape[1]
            if rest:
                seq = torch.cat([seq, seq.new_zeros((1, rest, seq.shape[-1]))], 1)
            answer = self._answer(args, encoded, seq, state)
            tab.charge(TAIL)
        self.last_tokens = torch.tensor([tokens], device=x.device)
        self.close_tab(tab, taken)
        return answer

    # --- exit cascade: calibration and training --------------------------------------------
    def _read_through(self, args: tuple[Tensor, ...], train: bool = False) -> _Trace:
        """The whole batch read stretch by stretch with its jumps and no exits: every exit's
        logits (the ExitCascade protocol), which stretches each sample reads and where it
        decides. Every stretch is computed for every sample and a skipped one mixed away
        (state carried); `train`: the jumps are straight-through Gumbel samples, so the mix
        carries their gradient (what the budget term and the distillation train them by)."""
        read = self.read_lengths(*args)
        encoded = self._encoded(args)
        k, n = self.num_exits, read.shape[0]
        skip = torch.zeros(n, dtype=torch.long, device=read.device)
        pending = torch.ones(n, device=read.device)  # the last jump decision (1: read on)
        decided_before = torch.zeros(n, dtype=torch.bool, device=read.device)
        state: RnnState | None = None
        last: Tensor | None = None
        trace = _Trace()
        spent, full = [], []
        for i in range(k + 1):
            start, end = self._start(i), self.boundary(i)
            alive = read > start
            reading = (skip == 0) & alive
            out, new = self._stretch(encoded, i, state)
            if state is None or last is None:
                mix = alive.to(out.dtype)
            else:
                chosen = torch.where(decided_before, pending, torch.ones_like(pending))
                mix = torch.where(skip == 0, chosen, pending) * alive.to(out.dtype)
                out = mix[:, None, None] * out + (1 - mix[:, None, None]) * last[:, None]
                new = _mix_state(new, state, mix)
            state, last = new, out[:, -1]
            trace.outs.append(out * alive[:, None, None].to(out.dtype))
            trace.ran.append(reading)
            spent.append(mix * alive * (end - start))
            full.append(alive.to(out.dtype) * (end - start))
            skip = torch.where(reading, skip, (skip - 1).clamp(min=0))
            if i == k:
                break
            trace.decided.append(read > end)
            trace.logits.append(self.heads[i](last))
            decides = reading & (read > end)  # where a jump is decided: after reading
            trace.jumped.append(decides)
            decided_before = decides
            if self.jump:
                logit = self.jump_heads[i](last)
                if train:
                    go = straight_through_gumbel(logit)
                    hard = go > 0.5
                else:
                    hard = gate_open(gate_probability(logit), self.jump_threshold)
                    go = hard.to(last.dtype)
                skip = torch.where(decides & ~hard, self.jump, skip)
                pending = torch.where(decides, go, pending)
        assert state is not None
        seq = torch.cat(trace.outs, 1)
        trace.logits.append(self._answer(args, encoded, seq, state))
        trace.ran_t = torch.stack(trace.ran)
        trace.decided_t = torch.stack(trace.decided)
        trace.jumped_t = torch.stack(trace.jumped)
        trace.share = torch.stack(spent).sum(0) / torch.stack(full).sum(0).clamp(min=1)
        return trace

    def exit_logits(
        self, x: Tensor | tuple[Tensor, Tensor], extra: Tensor | None = None
    ) -> list[Tensor]:
        """Every exit's logits and the original classifier's, for all samples (calibration,
        training): the RNN run stretch by stretch, as the forward runs it, with the jumps
        (which depend on the state and the jump threshold alone, never on the exits)."""
        return self._read_through(self.input_args(x, extra)).logits

    def training_loss(
        self,
        x: Tensor,
        teacher_logits: Tensor | None = None,
        labels: Tensor | None = None,
        config: LossConfig | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Self-distillation on every exit (as early exits train), each head on the samples
        that decide at its position (a head never decides for a text that has ended or a
        stretch that was skipped). With a jump head: its decisions straight-through Gumbel
        samples, plus the budget term on the share of tokens read (price x share, the price a
        PI controller on the share's distance from the budget, `budget_price`)."""
        config = config or LossConfig()
        args = self.input_args(x)
        trace = self._read_through(args, train=bool(self.jump))
        outputs, open_ = trace.logits, trace.decided_t
        teacher = (outputs[-1] if teacher_logits is None else teacher_logits).detach()
        temperature = config.temperature(KD_TEMPERATURE)
        losses, metrics = [], {}
        for i, logits in enumerate(outputs):
            final = i == self.num_exits
            rows = slice(None) if final else open_[i]
            if not final and not bool(rows.any()):
                continue
            y = None if labels is None else labels[rows]
            loss, stats = distillation(
                logits[rows], teacher[rows], y, temperature, config.label_weight
            )
            metrics["acc_final" if final else f"acc_exit{i}"] = stats["acc"]
            if final and not logits.requires_grad:
                continue
            losses.append(loss)
        total = torch.stack(losses).mean()
        if self.jump:
            budget = self.budget if config.budget is None else float(config.budget)
            share = float(trace.share.detach().mean())
            price = budget_price(self.budget_multiplier, share - budget, 1.0, 0.01)
            compute = priced_compute(trace.share, price)
            total = total + compute
            metrics.update(token_share=share, compute=float(compute.detach()), compute_price=price)
        metrics["loss"] = float(total.detach())
        return total, metrics

    def export_face(self) -> StopReadingFace:
        return StopReadingFace(self)


def tokens_read(model: DynamicModel) -> Tensor:
    """The tokens (RNN steps) each sample of this thread's last forward of a stop-reading
    `model` read, int64 [N]: its stretches run, jumped ones not counted."""
    if not isinstance(model, StopReadingModel):
        raise StrategyError(
            f"tokens_read needs a stop-reading model; got a "
            f"{getattr(model, 'strategy', '') or type(model).__name__} model."
        )
    if model.last_tokens is None:
        raise StrategyError("No forward has run in this thread yet.")
    return model.last_tokens


class _Trace:
    """What `_read_through` saw: logits per exit and the final, stretches read and
    checkpoints that decided per sample, the share of its tokens each sample read."""

    def __init__(self) -> None:
        self.outs: list[Tensor] = []
        self.logits: list[Tensor] = []
        self.ran: list[Tensor] = []
        self.decided: list[Tensor] = []
        self.jumped: list[Tensor] = []
        self.ran_t = torch.zeros(0)
        self.decided_t = torch.zeros(0)
        self.jumped_t = torch.zeros(0)
        self.share = torch.zeros(0)


def _mix_state(new: RnnState, old: RnnState, mix: Tensor) -> RnnState:
    """mix * new + (1 - mix) * old per sample (dim 1 of an RNN state)."""
    w = mix[None, :, None]
    if isinstance(new, tuple):
        assert isinstance(old, tuple)
        return tuple(w * a + (1 - w) * b for a, b in zip(new, old, strict=True))  # type: ignore[return-value]
    assert isinstance(old, Tensor)
    return w * new + (1 - w) * old


def scatter_state(state: RnnState | None, index: Tensor, rows: RnnState) -> RnnState:
    """`state` with the samples at `index` replaced by `rows` (the batch on dim 1)."""
    assert state is not None
    if isinstance(state, tuple):
        assert isinstance(rows, tuple)
        return tuple(s.index_copy(1, index, r) for s, r in zip(state, rows, strict=True))  # type: ignore[return-value]
    assert isinstance(rows, Tensor)
    return state.index_copy(1, index, rows)


class _Reading:
    """The samples of a batch still reading: their inputs, encoded inputs, tokens to read,
    rows in the batch, RNN state, last output and stretches left to skip."""

    def __init__(self, args: tuple[Tensor, ...], encoded: Tensor, read: Tensor, rows: Tensor):
        self.args, self.encoded, self.read, self.rows = args, encoded, read, rows
        self.axis = 1
        self.state: RnnState | None = None
        self.last: Tensor | None = None
        self.skip = torch.zeros_like(rows)

    def subset(self, mask: Tensor) -> _Reading:
        index = selected(mask)
        sub = _Reading(
            tuple(a.index_select(0, index) for a in self.args),
            self.encoded.index_select(1 - self.axis, index),
            self.read[index],
            self.rows[index],
        )
        sub.axis = self.axis
        sub.state = None if self.state is None else state_rows(self.state, index)
        sub.last = None if self.last is None else self.last[index]
        sub.skip = self.skip[index]
        return sub


class StopReadingFace(ExportFace):
    """`forward(x, thresholds) -> (logits, exit index [N])` with one `torch.cond` per exit:
    the next stretch runs, under the conditional, only on the samples still reading (an ONNX
    `If` per stretch; the stretch count is fixed by the input length, so no `Loop` is needed).
    """

    def __init__(self, model: StopReadingModel):
        super().__init__(model.thresholds)
        self.model = model
        self.extra_input_name = None if model.extra_input is None else model.extra_input.name
        self.register_buffer("temperatures", model.temperatures.detach().clone())

    def forward(
        self, x: Tensor | tuple[Tensor, Tensor], thresholds: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """`x`: the token ids, or the pair (ids, lengths / mask) of a model converted with
        them (exported as a second graph input)."""
        thr = self.thresholds_or_default(thresholds)
        m = self.model
        x, extra = as_inputs(x)
        args = (x,) if extra is None else (x, extra)
        read = m.read_lengths(*args)
        encoded = m._encoded(args)
        axis = m._time_axis()
        out, state = run_stretch(m.rnn, encoded.narrow(axis, 0, m.boundary(0)), None)
        x0 = args[0]
        streak = start_streak(x0.shape[0], x0.device) if m.policy.kind == "patience" else ()
        skip = torch.zeros_like(read)
        return self._stage(0, args, encoded, read, out, state, thr, tuple(streak), skip, skip == 0)

    def _stage(
        self,
        i: int,
        args: tuple[Tensor, ...],
        encoded: Tensor,
        read: Tensor,
        seq: Tensor,
        state: RnnState,
        thr: Tensor,
        streak: tuple[Tensor, ...],
        skip: Tensor,
        reading: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """After stretch i (`seq`: the outputs read so far, batch first): who stops here.
        `skip`: stretches each sample has left to skip; `reading`: who read stretch i (the
        others decide no jump here)."""
        m, k = self.model, self.model.num_exits
        x = args[0]
        pad = seq.new_zeros((seq.shape[0], m.steps - seq.shape[1], seq.shape[-1]))
        if i == k:
            return m._answer(args, encoded, torch.cat([seq, pad], 1), state), full_index(x, k)
        finished = read <= m.boundary(i)
        logits = m.heads[i](seq[:, -1])
        # the original classifier answers only for the texts that end here (an ONNX `If`)
        final_logits = _answer_ended(
            m, args, encoded, torch.cat([seq, pad], 1), state, finished, logits
        )
        carried = (streak[0], streak[1]) if streak else None
        leave, carried = exit_decision(
            logits, self.temperatures[i], thr[i], m.policy.kind, m.policy.patience, carried
        )
        leave = leave & ~finished
        streak = () if carried is None else carried
        if m.jump:  # a jump is decided after reading a stretch, never within a jump
            reads_on = gate_open(gate_probability(m.jump_heads[i](seq[:, -1])), m.jump_threshold)
            skip = torch.where(reading & ~finished & ~leave & ~reads_on, m.jump, skip)
        here = torch.where(leave[:, None], logits, final_logits.to(logits.dtype))
        decision = torch.where(leave, full_index(x, i), full_index(x, k))
        stop = leave | finished
        is_lstm = isinstance(state, tuple)
        flat_state = state if is_lstm else (state,)
        axis = m._time_axis()
        n_args = len(args)

        def all_stop(here, decision, stop, skip, *rest):
            return here.clone(), decision.clone()

        def go_on(here, decision, stop, skip, *rest):
            keep = selected(~stop)
            skip = skip.index_select(0, keep)
            reading = skip == 0
            inputs, (encoded, read, seq), rest = (
                rest[:n_args],
                rest[n_args : n_args + 3],
                rest[n_args + 3 :],
            )
            n_state = 2 if is_lstm else 1
            st = tuple(s.index_select(1, keep) for s in rest[:n_state])
            carried = tuple(c.index_select(0, keep) for c in rest[n_state:])
            enc = encoded.index_select(1 - axis, keep)
            start = m.boundary(i)
            stretch = enc.narrow(axis, start, m.boundary(i + 1) - start)
            if m.jump:  # only the samples that read run the stretch; the others carry over
                last = seq.index_select(0, keep)[:, -1:]
                out, new_state = _read_some(m.rnn, stretch, st, reading, last, axis)
            else:
                out, new_state = run_stretch(m.rnn, stretch, st if is_lstm else st[0])
            sub_logits, sub_exit = self._stage(
                i + 1,
                tuple(a.index_select(0, keep) for a in inputs),
                enc,
                read.index_select(0, keep),
                torch.cat([seq.index_select(0, keep), out], 1),
                new_state,
                thr,
                carried,
                torch.where(reading, skip, skip - 1),
                reading,
            )
            return (
                here.index_copy(0, keep, sub_logits.to(here.dtype)),
                decision.index_copy(0, keep, sub_exit),
            )

        operands = (here, decision, stop, skip, *args, encoded, read, seq, *flat_state, *streak)
        return cond(stop.all(), all_stop, go_on, operands)


def _answer_ended(
    m: StopReadingModel,
    args: tuple[Tensor, ...],
    encoded: Tensor,
    seq: Tensor,
    state: RnnState,
    ended: Tensor,
    like: Tensor,
) -> Tensor:
    """The original classifier's logits for the samples whose text has ended (`ended` [N]),
    gathered, run and scattered into zeros shaped as `like` [N, C]: a conditional, so a stage
    where no text ends runs no classifier."""
    is_lstm = isinstance(state, tuple)
    flat_state = state if is_lstm else (state,)
    n_args, batch_dim = len(args), 1 - m._time_axis()
    blank = torch.zeros_like(like)

    def nobody(blank, ended, encoded, seq, *rest):
        return blank.clone()

    def ended_rows(blank, ended, encoded, seq, *rest):
        rows = selected(ended)
        sub_args = tuple(a.index_select(0, rows) for a in rest[:n_args])
        sub_state = tuple(s.index_select(1, rows) for s in rest[n_args:])
        answer = m._answer(
            sub_args,
            encoded.index_select(batch_dim, rows),
            seq.index_select(0, rows),
            sub_state if is_lstm else sub_state[0],
        )
        return blank.index_copy(0, rows, answer.to(blank.dtype))

    operands = (blank, ended, encoded, seq, *args, *flat_state)
    return cond(ended.any(), ended_rows, nobody, operands)


def _read_some(
    rnn: nn.RNNBase,
    stretch: Tensor,
    flat_state: tuple[Tensor, ...],
    reading: Tensor,
    last: Tensor,
    axis: int,
) -> tuple[Tensor, RnnState]:
    """The export face's stretch under jumps: a conditional gather-run-scatter, so only the
    samples that read (`reading` [N]) run it (an ONNX `If`; none reading runs nothing); the
    others keep their state and repeat their last output `last` [N, 1, H]."""
    is_lstm = len(flat_state) == 2
    steps = stretch.shape[axis]
    held = last.expand(last.shape[0], steps, last.shape[-1]).contiguous()

    def nobody(stretch, reading, held, *flat):
        return (held.clone(), *(s.clone() for s in flat))

    def readers(stretch, reading, held, *flat):
        rows = selected(reading)
        sub_state = tuple(s.index_select(1, rows) for s in flat)
        out, new = run_stretch(
            rnn, stretch.index_select(1 - axis, rows), sub_state if is_lstm else sub_state[0]
        )
        new_flat = new if is_lstm else (new,)
        return (
            held.index_copy(0, rows, out.to(held.dtype)),
            *(s.index_copy(1, rows, n.to(s.dtype)) for s, n in zip(flat, new_flat, strict=True)),
        )

    out, *state = cond(reading.any(), readers, nobody, (stretch, reading, held, *flat_state))
    return out, (tuple(state) if is_lstm else state[0])
