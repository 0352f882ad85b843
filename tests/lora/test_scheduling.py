"""Device-free LoRA pieces: the scheduler's adapter-slot rule (never more distinct adapters
running than slots, no starvation), the prefix cache's adapter identity, the device-slot LRU
and the input batch's per-token slots."""

import itertools

import numpy as np
import pytest

from xlaserve.engine.block_manager import BlockManager
from xlaserve.engine.input_batch import InputBatch
from xlaserve.engine.request import Sequence
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.engine.scheduler import Scheduler, SchedulerConfig
from xlaserve.engine.scheduler_output import NewSequence, SchedulerOutput
from xlaserve.lora.adapter import LoRAAdapter
from xlaserve.lora.scheduling import AdapterAdmission
from xlaserve.lora.slots import SlotManager


def adapter(name: str) -> LoRAAdapter:
    identity = (name.encode().hex() * 64)[:64]
    return LoRAAdapter(name=name, path="", rank=1, scaling=1.0, identity=identity, weights={})


A, B, C, D = (adapter(n) for n in "ABCD")


def test_admission_rule_blocks_a_new_adapter_when_slots_are_full():
    rule = AdapterAdmission(2, [A.identity, A.identity, None])
    assert rule.may_admit(None) and rule.may_admit(B.identity)
    rule.admitted(B.identity)
    assert rule.may_admit(A.identity)  # running already: no new slot
    assert not rule.may_admit(C.identity)  # a third adapter: blocked
    # From then on no adapter sequence goes ahead of it (it would keep its adapter resident),
    # but base-model sequences do.
    assert not rule.may_admit(A.identity)
    assert rule.may_admit(None)
    assert AdapterAdmission(None, [A.identity]).may_admit(C.identity)  # LoRA off: no rule


def run_scheduler(scheduler, arrivals, max_steps=400):
    """Steps until done; arrivals: step -> [(request_id, adapter)]. Returns the distinct
    adapters running at each step and the step each request was first scheduled."""
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    distinct, started = [], {}
    for step in range(max_steps):
        for rid, lora in arrivals.get(step, []):
            scheduler.add_request(rid, [1, 2, 3], params, arrival_time=step, lora=lora)
        out = scheduler.schedule()
        running = {s.lora_key for s in scheduler.running if s.lora is not None}
        distinct.append(len(running))
        for seq_id in out.num_scheduled_tokens:
            seq = scheduler.get_sequence(seq_id)
            started.setdefault(seq.request_id, step)
        sampled = {}
        for seq_id, n in out.num_scheduled_tokens.items():
            seq = scheduler.get_sequence(seq_id)
            if seq.num_computed_tokens + n == seq.num_tokens:
                sampled[seq_id] = 5
        scheduler.update_from_output(out, sampled)
        if not scheduler.has_unfinished() and step >= max(arrivals):
            return distinct, started
    raise AssertionError("requests never finished (deadlock)")


def lora_scheduler(max_loras=2, max_num_seqs=4):
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64,
                                     max_model_len=32, page_size=4, num_pages=64,
                                     max_loras=max_loras))  # fmt: skip


def test_never_more_adapters_running_than_slots_and_all_finish():
    loras = [A, B, C, A, None, D, C, None, B, D]
    arrivals = {0: [(f"r{i}", lora) for i, lora in enumerate(loras)]}
    distinct, started = run_scheduler(lora_scheduler(), arrivals)
    assert max(distinct) == 2  # the slots are used, never exceeded
    assert set(started) == {f"r{i}" for i in range(len(loras))}
    assert started["r4"] == 0  # base-model requests do not wait for adapter slots


def test_an_adapter_waiting_for_a_slot_is_not_starved_by_running_adapters():
    # A and B requests keep arriving every step; C arrives at step 1 and must get a slot.
    counter = itertools.count()
    arrivals = {step: [(f"ab{next(counter)}", A), (f"ab{next(counter)}", B)]
                for step in range(40)}  # fmt: skip
    arrivals[1].append(("c", C))
    distinct, started = run_scheduler(lora_scheduler(max_num_seqs=8), arrivals)
    assert max(distinct) == 2
    assert started["c"] < 15  # admitted once A or B drained, not after the stream ends
    later = [rid for rid, step in started.items() if rid.startswith("ab") and step > started["c"]]
    assert later  # the stream went on after it


def test_max_loras_validated():
    with pytest.raises(ValueError, match="max_loras"):
        lora_scheduler(max_loras=0)


def seq(seq_id, tokens, lora=None):
    return Sequence(seq_id=seq_id, request_id=str(seq_id), prompt_token_ids=tokens,
                    params=SamplingParams(), max_model_len=64, lora=lora)  # fmt: skip


def test_prefix_cache_keys_pages_by_adapter_identity():
    bm = BlockManager(num_pages=32, page_size=4, enable_prefix_caching=True)
    tokens = list(range(1, 14))  # three full pages and one token
    first = seq(0, tokens, A)
    bm.allocate(first, len(tokens))
    first.num_computed_tokens = len(tokens)
    bm.cache_full_pages(first)
    assert bm.get_computed_prefix(seq(1, tokens, A))[1] == 12  # same adapter: shared
    renamed = LoRAAdapter(name="A2", path="elsewhere", rank=1, scaling=1.0,
                          identity=A.identity, weights={})  # fmt: skip
    assert bm.get_computed_prefix(seq(2, tokens, renamed))[1] == 12  # same weights
    assert bm.get_computed_prefix(seq(3, tokens, B))[1] == 0  # other weights
    assert bm.get_computed_prefix(seq(4, tokens, None))[1] == 0  # the base model


def test_slot_manager_is_lru_and_never_evicts_the_step_s_own_adapters():
    slots = SlotManager(2)
    assert slots.assign([A, B]) == [(1, A), (2, B)]
    assert slots.assign([A, A]) == []  # resident: no writes; B is now least recently used
    assert slots.assign([C]) == [(2, C)]  # B was least recently used
    assert slots.assign([B, C]) == [(1, B)]  # A goes, C (in the step) stays
    assert slots.slot_of(A.identity) is None and slots.slot_of(C.identity) == 2
    with pytest.raises(RuntimeError, match="3 adapters in one step"):
        slots.assign([A, B, C])


def test_input_batch_packs_each_token_s_adapter_slot():
    batch = InputBatch(max_num_seqs=4, pages_per_seq=4, page_size=4, vocab_size=97,
                       token_buckets=(16,), seq_buckets=(4,), max_loras=2)  # fmt: skip
    news = [NewSequence(seq_id=i, request_id=str(i), sample_index=0, token_ids=t,
                        num_prompt_tokens=len(t), params=SamplingParams(), page_ids=(i,),
                        num_computed_tokens=0, lora=lora)
            for i, (t, lora) in enumerate([((1, 2, 3), B), ((4, 5), None), ((6,), A)])]  # fmt: skip
    out = SchedulerOutput(new_seqs=tuple(news), num_scheduled_tokens={0: 3, 1: 2, 2: 1})
    step = batch.prepare(out)
    assert step.lora_writes == [(1, B), (2, A)]
    np.testing.assert_array_equal(step.inputs.lora_slots, [1, 1, 1, 0, 0, 2] + [0] * 10)
    plain = InputBatch(max_num_seqs=4, pages_per_seq=4, page_size=4, vocab_size=97)
    plain_step = plain.prepare(SchedulerOutput(new_seqs=(news[0],), num_scheduled_tokens={0: 3}))
    assert plain_step.inputs.lora_slots.tolist() == [0, 0, 0]  # LoRA off: every token slot 0
