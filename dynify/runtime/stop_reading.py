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

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dynify.frontend.inputs import as_inputs
from dynify.runtime import recurrence
from dynify.runtime.control import cond, full_index, scatter_rows, selected
from dynify.runtime.decisions import exit_decision, leaves_one, start_streak
from dynify.runtime.model import DynamicModel, ExportFace, PerCallRecord
from dynify.runtime.policy import ExitPolicy
from dynify.train.losses import LossConfig, distillation

KD_TEMPERATURE = 3.0  # the exits' own distillation temperature (LossConfig.kd_temperature None)

RnnState = Tensor | tuple[Tensor, Tensor]


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
        step_macs: int,
        fixed_macs: int,
        tail_macs: int,
        head_macs: Sequence[int],
        encode_is_input: bool,
        policy: ExitPolicy,
        thresholds: Sequence[float],
        static_macs: int,
        input_shape: tuple[int, ...],
        num_classes: int,
    ):
        super().__init__(
            static_macs=static_macs,
            input_shape=input_shape,
            num_classes=num_classes,
            thresholds=thresholds,
        )
        self.encode = encode
        self.rnn = rnn
        self.tail = tail
        self.position = position
        self.heads = nn.ModuleList(heads)
        self.every, self.steps = int(every), int(steps)
        self.step_macs, self.fixed_macs = int(step_macs), int(fixed_macs)
        self.tail_macs = int(tail_macs)
        self.head_macs = [int(m) for m in head_macs]
        self.encode_is_input = encode_is_input
        self.policy = policy
        self.register_buffer("temperatures", torch.ones(len(heads)))

    # --- geometry and costs ----------------------------------------------------------------
    @property
    def num_exits(self) -> int:
        """Exit heads, not counting the final classifier."""
        return len(self.heads)

    def boundary(self, i: int) -> int:
        """Tokens read when exit i decides (after stretch i)."""
        return min(self.steps, (i + 1) * self.every)

    def read_lengths(self, *args: Tensor) -> Tensor:
        """Tokens each sample must read for the original classifier's answer, int64 [N] in
        [1, steps], from the model's inputs: up to the last position the classifier reads
        (its gather index, its padding mask), or every token."""
        if self.position is None:
            return recurrence.full_lengths(args[0].shape[0], self.steps, args[0])
        return self.position(*args)

    def _stretches(self, read: Tensor, exit_index: Tensor) -> Tensor:
        """Stretches each sample ran, from tokens to read and the exit taken."""
        final = exit_index == self.num_exits
        return torch.where(final, (read + self.every - 1) // self.every, exit_index + 1)

    def tokens_read(self, read: Tensor, exit_index: Tensor) -> Tensor:
        """RNN steps [N] a sample runs, from tokens to read and the exit taken."""
        return (self._stretches(read, exit_index) * self.every).clamp(max=self.steps)

    def _costs(self, read: Tensor, exit_index: Tensor) -> Tensor:
        """MACs per sample [N] from tokens to read and the exit taken (num_exits: final)."""
        k = self.num_exits
        final = exit_index == k
        stretches = self._stretches(read, exit_index)
        tokens = (stretches * self.every).clamp(max=self.steps)
        heads_passed = torch.where(final, stretches - 1, exit_index + 1).clamp(max=k)
        head_sums = torch.tensor([0, *self.head_macs], device=read.device).cumsum(0)
        return (
            self.fixed_macs
            + tokens * self.step_macs
            + head_sums[heads_passed]
            + final.long() * self.tail_macs
        )

    def _cost_one(self, read: int, exit_index: int) -> tuple[int, int]:
        """(MACs, RNN steps) of one sample, in Python ints: `_costs` without its tensor ops,
        which would cost a batch-1 forward ~50 us."""
        final = exit_index == self.num_exits
        stretches = -(-read // self.every) if final else exit_index + 1
        tokens = min(stretches * self.every, self.steps)
        heads = min(stretches - 1 if final else exit_index + 1, self.num_exits)
        macs = self.fixed_macs + tokens * self.step_macs + sum(self.head_macs[:heads])
        return macs + (self.tail_macs if final else 0), tokens

    def exit_macs(self) -> list[int]:
        """What leaving at exit i costs a text that fills the whole input (the last entry: the
        original classifier after every token); shorter texts spend less (`sample_exit_costs`)."""
        full = torch.full((self.num_exits + 1,), self.steps, dtype=torch.long)
        return self._costs(full, torch.arange(self.num_exits + 1)).tolist()

    def sample_exit_costs(
        self, x: Tensor | tuple[Tensor, Tensor], extra: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(MACs [K + 1, N] of leaving at each exit, exits open [K, N]) per sample: a text
        that ends before exit i's position has finished reading there, so exit i is closed to
        it and its final answer costs only what it read."""
        read = self.read_lengths(*self.input_args(x, extra))
        k, n = self.num_exits, read.shape[0]
        exits = torch.arange(k + 1, device=read.device)
        macs = self._costs(read.expand(k + 1, n), exits[:, None].expand(k + 1, n))
        bounds = torch.tensor([self.boundary(i) for i in range(k)], device=read.device)
        return macs, read[None, :] > bounds[:, None]

    def forced_exit_macs(self) -> list[int]:
        """The most a sample can spend with exit i forced (threshold 0, as a MAC cap sets it),
        per exit: leaving there, or, for a text that has finished reading by exit i's position
        (exit i is closed to it), the original classifier's answer after reading up to it. The
        classifier may cost more than the head, so the second can be the dearer."""
        bounds = []
        for i, leave in enumerate(self.exit_macs()[:-1]):
            short = self._cost_one(self.boundary(i), self.num_exits)[0]
            bounds.append(max(leave, short))
        return bounds

    def worst_case_macs(self) -> int:
        """Every token read, every head evaluated, the original classifier run."""
        return self.exit_macs()[-1]

    def describe(self) -> list[dict[str, str]]:
        rows = []
        for i, macs in enumerate(self.exit_macs()):
            final = i == self.num_exits
            rows.append(
                {
                    "exit": "final" if final else str(i),
                    "tokens read": f"{self.steps if final else self.boundary(i)}",
                    "MACs": f"{macs / 1e6:.2f} M",
                    "of static": f"{macs / self.static_macs:.3f}",
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
        first; positions not read are zeros, which it does not read)."""
        if not self.rnn.batch_first:
            seq = seq.transpose(0, 1)
        if self.encode_is_input:
            return self.tail(*args, (seq, state))
        return self.tail(*args, encoded, (seq, state))

    # --- the forward -----------------------------------------------------------------------
    def forward(self, x: Tensor | tuple[Tensor, Tensor], extra: Tensor | None = None) -> Tensor:
        """Logits [N, C]; `extra`: the lengths or padding mask of a model converted with them
        (also accepted as `forward((x, extra))`)."""
        args = self.input_args(x, extra)
        x = args[0]
        if self._static:
            out = self._forward_static(args)
            self.last_exit = torch.full((x.shape[0],), self.num_exits, dtype=torch.long)
            self.last_macs = torch.full((x.shape[0],), self.static_macs, dtype=torch.long)
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
        batch, k, axis = x.shape[0], self.num_exits, self._time_axis()
        read = self.read_lengths(*args)
        exit_index = full_index(x, k)
        run = _Reading(args, self._encoded(args), read, torch.arange(batch, device=x.device), axis)
        policy_state = self.policy.start(batch, x.device)
        seq: Tensor | None = None
        output: Tensor | None = None
        for i in range(k + 1):
            start = i * self.every
            out, run.state = run_stretch(
                self.rnn, run.encoded.narrow(axis, start, self.boundary(i) - start), run.state
            )
            if seq is None:
                seq = out.new_zeros((batch, self.steps, out.shape[-1]))
            seq[run.rows, start : self.boundary(i)] = out
            finished = run.read <= self.boundary(i)
            if i == k or finished.all():
                logits = self._answer(run.args, run.encoded, seq[run.rows], run.state)
                output = scatter_rows(output, run.rows, logits, batch)
                break
            if finished.any():
                ended = run.subset(finished)
                logits = self._answer(ended.args, ended.encoded, seq[ended.rows], ended.state)
                output = scatter_rows(output, ended.rows, logits, batch)
                reading = ~finished
                run, out, policy_state = (
                    run.subset(reading),
                    out[reading],
                    policy_state.keep(reading),
                )
            logits = self.heads[i](out[:, -1])
            done = self.policy.decide(
                logits, self.temperatures[i], self.thresholds[i], policy_state
            )
            if done.any():
                output = scatter_rows(output, run.rows[done], logits[done], batch)
                exit_index[run.rows[done]] = i
                if done.all():
                    break
                run, policy_state = run.subset(~done), policy_state.keep(~done)
        assert output is not None
        self.last_exit = exit_index
        self.last_macs = self._costs(read, exit_index)
        self.last_tokens = self.tokens_read(read, exit_index)
        return output

    def _forward_one(self, args: tuple[Tensor, ...]) -> Tensor:
        """One sample: the same decisions as the batch path without its index bookkeeping,
        decided in Python floats (`leaves_one`, whose tie rule defers to the tensor rule)."""
        x = args[0]
        k, axis = self.num_exits, self._time_axis()
        read = int(self.read_lengths(*args)[0])
        encoded = self._encoded(args)
        thresholds = self.thresholds.tolist()
        temperatures = self.temperatures.tolist()
        outs: list[Tensor] = []
        state: RnnState | None = None
        taken, answer = k, None
        for i in range(k + 1):
            start = i * self.every
            out, state = run_stretch(
                self.rnn, encoded.narrow(axis, start, self.boundary(i) - start), state
            )
            outs.append(out)
            if read <= self.boundary(i):
                break
            logits = self.heads[i](out[:, -1])
            kind = self.policy.kind
            if leaves_one(logits, temperatures[i], thresholds[i], kind, self.temperatures[i]):
                taken, answer = i, logits
                break
        if answer is None:
            seq = torch.cat(outs, 1)
            rest = self.steps - seq.shape[1]
            if rest:
                seq = torch.cat([seq, seq.new_zeros((1, rest, seq.shape[-1]))], 1)
            answer = self._answer(args, encoded, seq, state)
        macs, tokens = self._cost_one(read, taken)
        self.last_tokens = torch.tensor([tokens], device=x.device)
        self.record_one(macs, taken, x.device)
        return answer

    # --- exit cascade: calibration and training --------------------------------------------
    def exit_logits(
        self, x: Tensor | tuple[Tensor, Tensor], extra: Tensor | None = None
    ) -> list[Tensor]:
        """Every exit's logits and the original classifier's, for all samples (calibration,
        training): the RNN run stretch by stretch, as the forward runs it."""
        args = self.input_args(x, extra)
        axis = self._time_axis()
        encoded = self._encoded(args)
        state: RnnState | None = None
        outs, logits = [], []
        for i in range(self.num_exits + 1):
            start = i * self.every
            out, state = run_stretch(
                self.rnn, encoded.narrow(axis, start, self.boundary(i) - start), state
            )
            outs.append(out)
            if i < self.num_exits:
                logits.append(self.heads[i](out[:, -1]))
        logits.append(self._answer(args, encoded, torch.cat(outs, 1), state))
        return logits

    def training_loss(
        self,
        x: Tensor,
        teacher_logits: Tensor | None = None,
        labels: Tensor | None = None,
        config: LossConfig | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Self-distillation on every exit (as early exits train), each head on the samples
        still reading at its position (a head never decides for a text that has ended)."""
        config = config or LossConfig()
        outputs = self.exit_logits(x)
        _, open_ = self.sample_exit_costs(x)
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
        metrics["loss"] = float(total.detach())
        return total, metrics

    def export_face(self) -> StopReadingFace:
        return StopReadingFace(self)


class _Reading:
    """The samples of a batch still reading: their inputs, encoded inputs, tokens to read,
    rows in the batch and RNN state."""

    def __init__(
        self, args: tuple[Tensor, ...], encoded: Tensor, read: Tensor, rows: Tensor, axis: int
    ):
        self.args, self.encoded, self.read, self.rows, self.axis = args, encoded, read, rows, axis
        self.state: RnnState | None = None

    def subset(self, mask: Tensor) -> _Reading:
        index = selected(mask)
        sub = _Reading(
            tuple(a.index_select(0, index) for a in self.args),
            self.encoded.index_select(1 - self.axis, index),
            self.read[index],
            self.rows[index],
            self.axis,
        )
        sub.state = None if self.state is None else state_rows(self.state, index)
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
        return self._stage(0, args, encoded, read, out, state, thr, tuple(streak))

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
    ) -> tuple[Tensor, Tensor]:
        """After stretch i (`seq`: the outputs read so far, batch first): who stops here."""
        m, k = self.model, self.model.num_exits
        x = args[0]
        pad = seq.new_zeros((seq.shape[0], m.steps - seq.shape[1], seq.shape[-1]))
        final_logits = m._answer(args, encoded, torch.cat([seq, pad], 1), state)
        if i == k:
            return final_logits, full_index(x, k)
        finished = read <= m.boundary(i)
        logits = m.heads[i](seq[:, -1])
        carried = (streak[0], streak[1]) if streak else None
        leave, carried = exit_decision(
            logits, self.temperatures[i], thr[i], m.policy.kind, m.policy.patience, carried
        )
        leave = leave & ~finished
        streak = () if carried is None else carried
        here = torch.where(leave[:, None], logits, final_logits.to(logits.dtype))
        decision = torch.where(leave, full_index(x, i), full_index(x, k))
        stop = leave | finished
        is_lstm = isinstance(state, tuple)
        flat_state = state if is_lstm else (state,)
        axis = m._time_axis()
        n_args = len(args)

        def all_stop(here, decision, stop, *rest):
            return here.clone(), decision.clone()

        def go_on(here, decision, stop, *rest):
            keep = selected(~stop)
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
            out, new_state = run_stretch(
                m.rnn,
                enc.narrow(axis, start, m.boundary(i + 1) - start),
                st if is_lstm else st[0],
            )
            sub_logits, sub_exit = self._stage(
                i + 1,
                tuple(a.index_select(0, keep) for a in inputs),
                enc,
                read.index_select(0, keep),
                torch.cat([seq.index_select(0, keep), out], 1),
                new_state,
                thr,
                carried,
            )
            return (
                here.index_copy(0, keep, sub_logits.to(here.dtype)),
                decision.index_copy(0, keep, sub_exit),
            )

        operands = (here, decision, stop, *args, encoded, read, seq, *flat_state, *streak)
        return cond(stop.all(), all_stop, go_on, operands)
