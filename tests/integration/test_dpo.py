"""DPO: ln 2 at step 0, reference modes agree, packed == unpacked log-probs, 2 ranks == 1 rank, bad rows."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import BIN, REPO, base_recipe, build_tiny, python_cmd, read_metrics, run_cmd, write_recipe, free_port
from llmtrain.config import SourceConfig
from llmtrain.data.batching import collate_sequences
from llmtrain.data.chat import RowError
from llmtrain.data.labels import IGNORE_INDEX
from llmtrain.data.preference import build_preference_samples, encode_pair, to_pair
from llmtrain.data.sources import BadRowReport
from llmtrain.objectives.dpo import pair_logps

DPO_TRAIN = os.path.join(REPO, "data/demo/dpo_train.jsonl")


def dpo_recipe(tmp_path, model_dir, **train):
    r = base_recipe(tmp_path, model_dir, **train)
    r["data"] = {"train": [DPO_TRAIN], "max_seq_len": 64, "max_prompt_len": 48, "packing": True}
    r["dpo"] = {"beta": 0.1, "loss": "sigmoid"}
    return r


def run_dpo(tmp_path, recipe, name="r.yaml", launcher=None):
    path = write_recipe(tmp_path / name, recipe)
    if launcher == "torchrun":
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
               os.path.join(REPO, "launch/dpo.py"), "--recipe", path]
    else:
        cmd = python_cmd("launch/dpo.py", "--recipe", path)
    proc = run_cmd(cmd, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [r for r in read_metrics(recipe["output_dir"]) if "loss" in r]


@pytest.fixture(scope="module")
def frozen_copy_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo_ref")
    return run_dpo(tmp, dpo_recipe(tmp, tiny_model_dir, max_steps=3, grad_accum=4, lr=5e-3))


def test_first_step_loss_is_ln2_when_policy_equals_reference(frozen_copy_run):
    first = frozen_copy_run[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["reward_accuracy"] == 0.0 and abs(first["reward_margin"]) < 1e-7
    assert frozen_copy_run[-1]["loss"] != pytest.approx(math.log(2), abs=1e-4)  # and it does move


def test_precomputed_reference_gives_the_same_losses_as_a_frozen_copy(frozen_copy_run, tiny_model_dir, tmp_path):
    rows = run_dpo(tmp_path, dpo_recipe(tmp_path, tiny_model_dir, max_steps=3, grad_accum=4, lr=5e-3)
                   | {"dpo": {"beta": 0.1, "loss": "sigmoid", "precompute_ref": True}})
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in frozen_copy_run], abs=1e-6)
    assert [r["reward_margin"] for r in rows] == pytest.approx([r["reward_margin"] for r in frozen_copy_run], abs=1e-6)


def test_nll_weight_adds_the_chosen_per_token_nll(frozen_copy_run, tiny_model_dir, tmp_path):
    # RPO: loss = DPO + w * chosen NLL per token; at step 0 DPO is ln 2, so the first loss is
    # ln 2 + w * the chosen NLL the plain DPO run logged on the same first batch
    w = 0.5
    rows = run_dpo(tmp_path, dpo_recipe(tmp_path, tiny_model_dir, max_steps=1, grad_accum=4, lr=5e-3)
                   | {"dpo": {"beta": 0.1, "loss": "sigmoid", "nll_weight": w}})
    plain = frozen_copy_run[0]
    assert plain["chosen_nll"] > 1.0  # an untrained model: several nats per token
    assert rows[0]["preference_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["loss"] == pytest.approx(math.log(2) + w * plain["chosen_nll"], rel=1e-6)


@pytest.mark.multiproc
def test_two_ranks_zero3_match_one_rank_with_accumulation(frozen_copy_run, tiny_model_dir, tmp_path):
    recipe = dpo_recipe(tmp_path, tiny_model_dir, max_steps=3, grad_accum=2, lr=5e-3)
    recipe["deepspeed"]["config"] = os.path.join(REPO, "ds_configs/zero3.json")
    rows = run_dpo(tmp_path, recipe, launcher="torchrun")
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in frozen_copy_run], rel=1e-4, abs=1e-6)
    assert [r["reward_accuracy"] for r in rows] == pytest.approx([r["reward_accuracy"] for r in frozen_copy_run])


def test_dropout_is_off_in_the_policy_so_a_dropout_model_starts_at_ln2(tmp_path):
    """A base with attention dropout 0.5: with dropout left on, the policy's log-probs are noisy
    and step 0 is not ln 2; preference training switches it off (final/ keeps the config value)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from conftest import TINY, TOKENIZER

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    spec = dict(TINY["llama"])
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, attention_dropout=0.5, **spec)
    torch.manual_seed(0)
    model_dir = str(tmp_path / "dropout-llama")
    AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = run_dpo(tmp_path, dpo_recipe(tmp_path, model_dir, max_steps=1, grad_accum=2, lr=5e-3))
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(rows[0]["reward_margin"]) < 1e-7
    saved = json.load(open(os.path.join(tmp_path, "run", "final", "config.json")))
    assert saved["attention_dropout"] == 0.5


@pytest.mark.parametrize("arch,dropout", [("gpt2", {"resid_pdrop": 0.3, "embd_pdrop": 0.3, "attn_pdrop": 0.3}),
                                          ("llama", {"attention_dropout": 0.3})])
def test_disable_dropout_makes_training_mode_forwards_deterministic(arch, dropout):
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import TINY
    from llmtrain.objectives.dpo import disable_dropout

    spec = dict(TINY[arch])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), vocab_size=300, **spec, **dropout),
                                             attn_implementation="sdpa")
    model.train()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is live
        assert disable_dropout(model) > 0
        assert model.training and torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
        model.eval()
        reference = model(input_ids=ids).logits
        model.train()
        assert torch.equal(model(input_ids=ids).logits, reference)


def _pairs(tok, n=5):
    rows = [json.loads(l) for l in open(DPO_TRAIN)][:n]
    return [encode_pair(tok, r, 64, 48) for r in rows]


def _hand_response_logp(model, ids, labels) -> tuple[float, int]:
    """(sum of log-probs of the response tokens, their number) from a plain forward of one sequence."""
    logits = model(input_ids=torch.tensor(ids[None], dtype=torch.long)).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1)
    tgt = torch.tensor(labels[1:], dtype=torch.long)
    keep = tgt != IGNORE_INDEX
    return logp[keep].gather(-1, tgt[keep, None]).sum().item(), int(keep.sum())


def test_ipo_compares_per_token_averaged_logps():
    """IPO's target margin 1/(2 beta) applies to per-token averaged log-probs (as TRL): checked
    against the paper's formula on a plain forward of each response, with a made-up reference."""
    from llmtrain.config import Config
    from llmtrain.objectives import DPO

    model, tok = build_tiny("qwen2")
    model.eval()
    pairs = _pairs(tok, n=4)
    flat = [s for p in pairs for s in p]
    batch = collate_sequences([flat[:4], flat[4:]], tok.pad_token_id)  # packed
    batch["unit_ids"] = torch.arange(len(pairs))
    beta = 0.5
    cfg = Config()
    cfg.dpo.loss, cfg.dpo.beta = "ipo", beta
    task = DPO.from_config(cfg)
    task.ref_table = torch.tensor([[-9.0, -11.0], [-4.0, -3.5], [-20.0, -26.0], [-7.0, -7.5]], dtype=torch.float64)
    with torch.no_grad():
        loss, _ = task.loss(model, batch, global_weight=len(pairs))
        hand = []
        for (ref_c, ref_r), (chosen, rejected) in zip(task.ref_table.tolist(), pairs):
            (pc, nc), (pr, nr) = _hand_response_logp(model, *chosen), _hand_response_logp(model, *rejected)
            h = (pc / nc - pr / nr) - (ref_c / nc - ref_r / nr)
            hand.append((h - 1 / (2 * beta)) ** 2)
    assert loss.item() == pytest.approx(sum(hand) / len(hand), rel=1e-5)


def test_sequence_logps_ignore_prompt_and_padding_and_packed_equals_unpacked():
    model, tok = build_tiny("qwen2")
    model.eval()
    pairs = _pairs(tok)
    flat = [s for p in pairs for s in p]
    unpacked = collate_sequences([[s] for s in flat], tok.pad_token_id)
    packed = collate_sequences([flat[:4], flat[4:]], tok.pad_token_id)
    with torch.no_grad():
        c1, r1 = pair_logps(model, unpacked)
        c2, r2, lengths = pair_logps(model, packed, with_lengths=True)
        torch.testing.assert_close(c1, c2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r1, r2, rtol=1e-5, atol=1e-5)
        # the chosen lengths (RPO's per-token normaliser) count each chosen response's target tokens
        assert lengths.tolist() == [[float((labels[1:] != IGNORE_INDEX).sum()) for _, labels in p] for p in pairs]
        # independent computation: each response scored alone, summing log-probs of response tokens only
        for k, (ids, labels) in enumerate(flat):
            expected, _ = _hand_response_logp(model, ids, labels)
            got = (c1 if k % 2 == 0 else r1)[k // 2]
            assert abs(got.item() - expected) < 1e-4
        # the response mask covers the answer and its end-of-turn token only
        ids, labels = flat[0]
        first = json.loads(open(DPO_TRAIN).readline())
        chosen = first["chosen"] if isinstance(first["chosen"], str) else first["chosen"][-1]["content"]
        assert tok.decode(ids[labels != IGNORE_INDEX]).strip() == f"{chosen}<|im_end|>"


@pytest.mark.parametrize("row,reason", [
    ({"prompt": "1+1?", "chosen": "2", "rejected": "2"}, "chosen equals rejected"),
    ({"prompt": "1+1?", "chosen": " ", "rejected": "3"}, "empty response"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}, "prompt differs"),
    ({"prompt": "1+1?", "chosen": "2"}, "needs 'chosen' and 'rejected'"),
])
def test_bad_preference_rows(row, reason):
    with pytest.raises(RowError, match=reason):
        to_pair(row)


def test_bad_preference_rows_are_counted_with_file_and_line(tmp_path):
    _, tok = build_tiny("llama")
    path = tmp_path / "p.jsonl"
    good = {"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}
    rows = [good, {"prompt": "x " * 100, "chosen": "2", "rejected": "3"}, {"prompt": "q", "chosen": "a", "rejected": "a"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = BadRowReport()

    class Cfg:  # the two keys encode_pair reads
        class data:
            max_seq_len, max_prompt_len = 64, 32

    samples = build_preference_samples(tok, [SourceConfig(str(path))], Cfg, "data.train", report)
    assert len(samples) == 1 and samples.num_seqs == 2
    assert {b.origin for b in report.bad} == {f"{path}:2", f"{path}:3"}
    assert "over data.max_prompt_len=32" in report.bad[0].reason


@pytest.mark.parametrize("form", ["strings", "messages"])
def test_preference_rows_read_the_same_from_jsonl_json_parquet_and_a_saved_dataset(tmp_path, form):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, tok = build_tiny("llama")
    rows = [json.loads(l) for l in open(DPO_TRAIN)]
    want_str = form == "strings"
    rows = [r for r in rows if isinstance(r["prompt"], str) == want_str][:12]
    if form == "messages":  # UltraFeedback-style: chosen/rejected as full conversations incl. the prompt
        rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "p_ds"))

    class Cfg:  # the two keys encode_pair reads
        class data:
            max_seq_len, max_prompt_len = 64, 48

    # independent expectation: every row encoded directly, chosen then rejected
    expected = [seq for r in rows for seq in encode_pair(tok, r, 64, 48)]
    for name in ("p.jsonl", "p.json", "p.parquet", "p_ds"):
        report = BadRowReport()
        samples = build_preference_samples(tok, [SourceConfig(str(tmp_path / name))], Cfg, "data.train", report)
        assert not report.bad, (name, report.summary())
        assert len(samples) == len(rows) and samples.num_seqs == 2 * len(rows), name
        for j, (ids, labels) in enumerate(expected):
            got_ids, got_labels = samples.seq(j)
            assert np.array_equal(got_ids, ids) and np.array_equal(got_labels, labels), (name, j)


def test_resumed_dpo_run_logs_the_uninterrupted_losses(tiny_model_dir, tmp_path):
    """Interrupted after its step-2 checkpoint and resumed: same losses bitwise (the precomputed
    reference log-probs are read back from the cache, not recomputed from the trained policy)."""
    import shutil

    recipe = dpo_recipe(tmp_path, tiny_model_dir, max_steps=4, grad_accum=2, lr=5e-3, save_every=2, keep_last=3)
    recipe["dpo"]["precompute_ref"] = True
    reference = [r["loss"] for r in run_dpo(tmp_path, recipe)]
    out = recipe["output_dir"]
    shutil.rmtree(os.path.join(out, "checkpoints", "step_00000004"))
    shutil.rmtree(os.path.join(out, "final"))
    resumed = [r["loss"] for r in run_dpo(tmp_path, recipe)]
    assert resumed == reference


def test_make_dpo_pairs_rejects_the_models_own_greedy_mistakes(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(l) for l in open(os.path.join(REPO, "data/demo/dpo_eval.jsonl"))][:6]
    source, out = tmp_path / "src.jsonl", tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = python_cmd("examples/make_dpo_pairs.py", "--model", tiny_model_dir, "--source", str(source),
                     "--out", str(out), "--samples", "1")
    proc = run_cmd(cmd, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pairs = [json.loads(l) for l in open(out)]
    assert len(pairs) == len(rows)
    # independent greedy decode with plain transformers: the untrained model's reply is the rejected one
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")]
    checked = 0
    for row, pair in zip(rows, pairs):
        chosen, _ = to_pair(row)
        assert pair["prompt"] == chosen[:-1] and pair["chosen"][0]["content"] == chosen[-1]["content"]
        ids = tok.apply_chat_template(chosen[:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=12, do_sample=False, eos_token_id=stops, pad_token_id=0)
        greedy = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        if greedy and greedy != chosen[-1]["content"]:
            assert pair["rejected"][0]["content"] == greedy
            checked += 1
        to_pair(pair)  # a valid preference row: same prompt, chosen != rejected
    assert checked >= 3  # an untrained model gets (nearly) every answer wrong
    # an existing output is not replaced without --overwrite
    proc = run_cmd(cmd, timeout=120)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    # a bad source row: one line naming file:line, no traceback
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n")
    proc = run_cmd(python_cmd("examples/make_dpo_pairs.py", "--model", tiny_model_dir, "--source", str(bad),
                              "--out", str(tmp_path / "bad_pairs.jsonl")), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {bad}:2: chosen equals rejected: nothing to prefer"
    assert not (tmp_path / "bad_pairs.jsonl").exists()
