"""The per-request reference: every test prompt served with its own task's adapter, in one mixed batch.

This is what the serving layer does instead of fusing: ``serving.engine.Engine`` holds
each task's adapter in a slot, the iteration-level ``Scheduler`` batches every task's
prompts together, and each row is routed through its own slot (greedy decoding). Its
accuracy should equal each adapter's individual accuracy (normalized accuracy 1); the
difference, where there is one, comes from floating-point near-ties between a batched
routed forward and a dense merged one.
"""

from __future__ import annotations

from pathlib import Path

from adapters_zoo.basis import Basis
from adapters_zoo.prompts import single_bos
from adapters_zoo.tasks import exact_match
from adapters_zoo.tasks.chat import check, prompt_messages, reference_answer, render_prompt
from fusion_quality.scoring import CHAT_MAX_NEW_TOKENS, MAX_NEW_TOKENS
from fusion_quality.sources import Source

MAX_BATCH = 128  # rows decoded together
TIMEOUT_S = 4 * 3600.0  # a mixed batch of 1600 prompts on a busy 2-core machine


class PerRequestServer:
    """One engine on its own copy of the base model, shared by every source of a run."""

    def __init__(self, model_dir: Path, basis: Basis, slots: int, max_residual_rank: int, dtype: str = "float32"):
        from serving.engine import Engine, EngineConfig

        config = EngineConfig(device="cpu", dtype=dtype, slots=slots, residual_slots=slots,
                              max_residual_rank=max_residual_rank, mixture_cache=4 * slots)
        self.engine = Engine.load(model_dir, basis, config)

    def accuracy(self, source: Source, examples: dict[str, list[dict]], chat_tasks: dict | None = None
                 ) -> dict[str, float]:
        """Per task: exact match (chat: the task's checker on the reply to the chat-template prompt) when every
        example is served with that task's adapter, all tasks in one batch."""
        from serving.engine import Mixture
        from serving.generation import SamplingParams
        from serving.scheduler import GenerationRequest, Scheduler, SchedulerConfig, generate

        tokenizer = self.engine.tokenizer
        mixtures = {
            task: self.engine.prepare(Mixture.of([(f"{source.suite}/{source.name}/{task}", 1.0)],
                                                 digests={f"{source.suite}/{source.name}/{task}": source.digest}),
                                      lambda _, a=source.adapters[task]: a)
            for task in examples
        }
        params = SamplingParams(max_tokens=CHAT_MAX_NEW_TOKENS if chat_tasks else MAX_NEW_TOKENS, temperature=0.0)
        rows = []  # interleaved: every batch mixes every task
        longest = max(len(v) for v in examples.values())
        for i in range(longest):
            for task, exs in examples.items():
                if i < len(exs):
                    rows.append((task, exs[i]))
        def prompt(ex: dict) -> list[int]:
            text = render_prompt(tokenizer, prompt_messages(ex)) if chat_tasks else ex["prompt"]
            return tokenizer(single_bos(tokenizer, text))["input_ids"]

        requests = [GenerationRequest(prompt(ex), params, mixtures[task]) for task, ex in rows]
        scheduler = Scheduler(self.engine, SchedulerConfig(max_batch=MAX_BATCH, max_queue=len(requests) + 1)).start()
        try:
            events = generate(scheduler, requests, timeout=TIMEOUT_S)
        finally:
            scheduler.stop()
        hits: dict[str, list[bool]] = {task: [] for task in examples}
        for (task, ex), event in zip(rows, events):
            if event.kind == "error":
                raise event.error
            if chat_tasks:
                hits[task].append(check(chat_tasks[task], event.output, reference_answer(ex)))
            else:
                hits[task].append(exact_match(event.output, ex["completion"], tokenizer.eos_token))
        return {task: sum(h) / len(h) for task, h in hits.items()}
