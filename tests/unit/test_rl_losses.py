"""RL loss functions (llmtrain/losses/rl.py) against hand computations (each expected value is
derived in a comment), and the keyed rollout sampler's batch invariance."""
import math

import torch

from llmtrain.losses.rl import (gae, grpo_advantages, kl_k1_tokens, kl_k3, kl_k3_tokens, outcome_token_rewards,
                                masked_entropy_sum, policy_loss_sum, rloo_advantages, token_entropy,
                                value_loss_sum, whiten)


def close(a, b, tol=1e-6):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert torch.allclose(a, b, atol=tol), (a, b)


R = torch.tensor([[1., 0., 0., 1.], [1., 1., 1., 1.], [0., 0., 0., 1.]])  # rewards (prompts, samples)


def test_group_advantages_on_a_reward_table():
    # GRPO: group 0 mean .5, unbiased std sqrt(4 x .25 / 3) = .57735 -> +-.5 / (.57735 + 1e-4);
    # group 1 constant -> 0; group 2 mean .25, std sqrt((3 x .0625 + .5625) / 3) = .5 -> -.25/.5001, .75/.5001
    s0 = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    close(grpo_advantages(R), [[s0, -s0, -s0, s0], [0] * 4, [-.25 / .5001] * 3 + [.75 / .5001]])
    close(grpo_advantages(R, scale_std=False), [[.5, -.5, -.5, .5], [0] * 4, [-.25] * 3 + [.75]])  # Dr. GRPO
    # RLOO: r=1 in group 0: the others' mean (0+0+1)/3 -> 1 - 1/3 = 2/3; r=0: 0 - 2/3; group 2: r=1: 1 - 0; r=0: 0 - 1/3
    close(rloo_advantages(R), [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0] * 4, [-1 / 3] * 3 + [1]])


def test_clipped_surrogate_first_inner_step_and_asymmetric_clip():
    # first inner step (logp == old): ratio 1, nothing clipped, loss -sum A, d loss / d logp = -A (REINFORCE)
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    loss, m = policy_loss_sum(logp, logp.detach(), torch.tensor([0.7]), torch.tensor([[1, 1, 0]]), 0.2, 0.28)
    loss.backward()
    close(loss, -1.4)
    close(logp.grad, [[-0.7, -0.7, 0.0]])
    assert int(m["clipped_tokens"]) == 0 and float(m["ratio_sum"]) == 2.0
    # ratio 1.5, A=+1 -> clipped at 1 + .28: loss -1.28, no gradient; ratio .5, A=-1 -> min(-.5, -.8) = -.8
    # (clipped at 1 - .2), no gradient; ratio 1.5, A=-1 -> min(-1.5, -1.28) = -1.5: not clipped, gradient 1.5
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.5]])).requires_grad_(True)
    loss, m = policy_loss_sum(lp, torch.zeros(1, 3), torch.tensor([[1.0, -1.0, -1.0]]), torch.ones(1, 3), 0.2, 0.28)
    loss.backward()
    close(loss, -1.28 + 0.8 + 1.5)
    close(lp.grad, [[0.0, 0.0, 1.5]])
    assert int(m["clipped_tokens"]) == 2


def test_kl_estimators():
    x = torch.tensor([[-1.0, -2.0]])
    close(kl_k3(x, x, torch.ones(1, 2)), 0.0)  # policy == reference
    close(kl_k1_tokens(x, x), [[0.0, 0.0]])
    close(kl_k3_tokens(torch.tensor([-1.1]), torch.tensor([-1.0])), [math.exp(0.1) - 0.1 - 1])  # d = .1
    close(kl_k1_tokens(torch.tensor([-1.1]), torch.tensor([-1.0])), [-0.1])
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])  # E_pi[k] = KL(pi || ref), exactly
    close((p * kl_k3_tokens(p.log(), q.log())).sum(), (p * (p / q).log()).sum())
    close((p * kl_k1_tokens(p.log(), q.log())).sum(), (p * (p / q).log()).sum())


def test_gae_token_rewards_value_loss_entropy():
    # rewards [0,0,1], V [.5,.6,.7], gamma 1, lam .95: d2 = 1 - .7 = .3; d1 = .7 - .6 = .1 -> A1 = .1 + .95 x .3
    # = .385; d0 = .6 - .5 = .1 -> A0 = .1 + .95 x .385 = .46575; R = A + V; the masked 4th position is skipped
    adv, ret = gae(torch.tensor([[0., 0., 1., 0.]]), torch.tensor([[.5, .6, .7, 9.]]), torch.tensor([[1, 1, 1, 0]]),
                   1.0, .95)
    close(adv, [[.46575, .385, .3, 0]])
    close(ret, [[.96575, .985, 1.0, 0]])
    r = outcome_token_rewards(torch.tensor([2.0]), torch.tensor([[1, 1, 1, 0]]), torch.tensor([[.1, .2, .3, .4]]), 0.5)
    close(r, [[-.05, -.1, 2 - .15, 0]])  # score at the last token, minus .5 x k1 per token
    # V=1, V_old=.5, R=1.2, c=.2 -> clipped V = .7; .5 x max((1 - 1.2)^2, (.7 - 1.2)^2) = .5 x .25 = .125
    close(value_loss_sum(torch.tensor([[1.0]]), torch.tensor([[.5]]), torch.tensor([[1.2]]), torch.ones(1, 1), .2)[0], .125)
    close(token_entropy(torch.zeros(1, 1, 4)), [[math.log(4)]])  # uniform over 4 tokens
    logits, mask = torch.randn(2, 5, 7), torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 1, 0]])
    close(masked_entropy_sum(logits, mask, chunk_rows=2), (token_entropy(logits) * mask).sum(), 1e-5)


def hand_gae(rewards, values, gamma, lam):
    """GAE of one completion with plain Python floats, straight from the definition (no recursion):
    A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V after the end = 0."""
    n = len(rewards)
    v = list(values) + [0.0]
    delta = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(n)]
    adv = [sum((gamma * lam) ** l * delta[t + l] for l in range(n - t)) for t in range(n)]
    return adv, [a + v[t] for t, a in enumerate(adv)]


def test_gae_matches_a_hand_loop_with_discount_and_lambda_below_one():
    # two completions of 4 and 2 tokens in a (2, 5) table; masked cells hold junk that must not leak in
    rewards = torch.tensor([[0.1, -0.2, 0.0, 1.5, 7.0], [0.3, 2.0, 5.0, 5.0, 5.0]])
    values = torch.tensor([[0.4, 0.2, -0.1, 0.8, 9.0], [1.0, -0.5, 3.0, 3.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    for gamma, lam in ((0.9, 0.8), (1.0, 0.95), (0.5, 0.0)):
        adv, ret = gae(rewards, values, mask, gamma, lam)
        for b, n in enumerate((4, 2)):
            a_hand, r_hand = hand_gae(rewards[b, :n].tolist(), values[b, :n].tolist(), gamma, lam)
            close(adv[b, :n], a_hand)
            close(ret[b, :n], r_hand)
            close(adv[b, n:], [0.0] * (5 - n))
            close(ret[b, n:], [0.0] * (5 - n))
    # one worked value, gamma .9 lam .8, row 1: delta_1 = 2 - (-.5) = 2.5; delta_0 = .3 + .9 x -.5 - 1 = -1.15;
    # A_0 = -1.15 + .72 x 2.5 = .65
    close(gae(rewards, values, mask, 0.9, 0.8)[0][1, :2], [0.65, 2.5])


def test_ppo_token_rewards_and_value_loss_by_hand():
    # scores 1 and -2 on the last tokens (index 2 and 0), k1 [[.2,-.1,.4],[.3,.3,.3]], beta .1:
    # row 0: [-.02, .01, 1 - .04]; row 1: [-2 - .03, 0, 0] (masked positions 0)
    r = outcome_token_rewards(torch.tensor([1.0, -2.0]), torch.tensor([[1, 1, 1], [1, 0, 0]]),
                              torch.tensor([[.2, -.1, .4], [.3, .3, .3]]), 0.1)
    close(r, [[-.02, .01, .96], [-2.03, 0, 0]])
    close(outcome_token_rewards(torch.tensor([1.0]), torch.tensor([[1, 1, 0]])), [[0, 1, 0]])  # no KL term
    # value loss, c = .2, per token (V, V_old, R):
    #   (.5, .45, 1.0): inside the range: .5 x max(.25, .25) = .125, not clipped
    #   (1.0, .5, 1.2): clipped V = .7: .5 x max(.04, .25) = .125, clipped (the clipped term is larger)
    #   (1.0, .5, 0.0): clipped V = .7: .5 x max(1, .49) = .5, not clipped (the unclipped term is larger)
    #   (3.0, 0.0, 0.0): masked out
    v, v_old, ret = (torch.tensor([x]) for x in ([.5, 1., 1., 3.], [.45, .5, .5, 0.], [1., 1.2, 0., 0.]))
    loss, m = value_loss_sum(v, v_old, ret, torch.tensor([[1, 1, 1, 0]]), 0.2)
    close(loss, .125 + .125 + .5)
    assert int(m["clipped_tokens"]) == 1
    # whitening: x = [1, 2, 3] on this rank, [5] on another: S1 = 11, S2 = 39, N = 4, mean 2.75,
    # unbiased var (39 - 4 x 2.75^2) / 3 = 8.75 / 3
    sd = math.sqrt(8.75 / 3 + 1e-8)
    close(whiten(torch.tensor([[1., 2., 3., 9.]]), torch.tensor([[1, 1, 1, 0]]), 11., 39., 4.),
          [[(1 - 2.75) / sd, (2 - 2.75) / sd, (3 - 2.75) / sd, 0.]])


def test_keyed_sampler_is_batch_invariant(tiny_model_dir):
    """Same keys, prompts reordered and split into other batches: the same completions (HF's multinomial
    draws from the global RNG and is not)."""
    from transformers import AutoModelForCausalLM

    from llmtrain.objectives.rl.generation import generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [[5 + i, 17, 40 + 2 * i][: 1 + i % 3] for i in range(6)]
    keys = [(0, i, 0) for i in range(6)]
    kw = dict(seed=3, temperature=1.0, top_p=0.9, max_new_tokens=5, stop_ids=[0], pad_id=0, synced_gpus=False,
              device="cpu")
    whole = generate(model, prompts, keys=keys, batch_size=6, **kw)
    order = [4, 1, 5, 0, 3, 2]
    split = generate(model, [prompts[i] for i in order], keys=[keys[i] for i in order], batch_size=4, **kw)
    assert [split[order.index(i)] for i in range(6)] == whole
    greedy = generate(model, prompts, keys=None, batch_size=6, **kw)
    assert greedy != whole  # sampling at T=1 on a random model does differ from greedy


def test_batch_shape_and_rewards():
    import pytest

    from llmtrain.config import RLConfig, TrainConfig
    from llmtrain.errors import ConfigError
    from llmtrain.objectives.rl.rewards import exact_match, load_reward_fns, score
    from llmtrain.objectives.rl.rollout import check_batch_shape

    r = RLConfig(prompts_per_step=8, num_generations=4, mini_batches=2)
    assert check_batch_shape(r, TrainConfig(micro_batch_size=4, grad_accum=2), 2) == 8  # 8 x 4 / (2 x 2)
    with pytest.raises(ConfigError, match="micro_batch_size x train.grad_accum = 8"):
        check_batch_shape(r, TrainConfig(micro_batch_size=4, grad_accum=1), 2)
    with pytest.raises(ConfigError, match="multiple of rl.mini_batches x world size"):
        check_batch_shape(r, TrainConfig(micro_batch_size=4, grad_accum=2), 3)
    with pytest.raises(ConfigError, match="cannot be imported"):
        load_reward_fns(["llmtrain.objectives.rl.rewards:nope"], [], lambda k: k)
    fns = load_reward_fns(["llmtrain.objectives.rl.rewards:exact_match"] * 2, [1.0, 0.5], lambda k: k)
    total, per_fn, missing = score(fns, [[], []], [" 12 ", "3"], {"answer": ["12", "4"]})
    assert total == [1.5, 0.0] and per_fn["exact_match"] == [1.0, 0.0] and missing["exact_match"] == [False, False]
    assert exact_match(None, ["7"], [7]) == [1.0]
    from llmtrain.objectives.rl.rewards import prefix_match  # common prefix / longer length, by hand:
    assert prefix_match(None, [" 1234 ", "1245", "12345", "", "9"], ["1234", "1234", "1234", "12", "1"]) == \
        [1.0, 2 / 4, 4 / 5, 0.0, 0.0]


def test_reward_model_reward_is_the_head_at_the_conversation_end(tmp_path, tiny_model_dir):
    """rl.reward_model: each (prompt, completion) re-encoded as a conversation (the reward task's chat
    path) and scored by a plain forward of the sequence-classification model at its last token."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmtrain.data.chat import ensure_chat_template, tokenize_chat
    from llmtrain.objectives.rl.rewards import RewardModelFn

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    fn = RewardModelFn(str(tmp_path / "rm"), "cpu")
    prompts = [[{"role": "user", "content": "Reverse 12"}], [{"role": "user", "content": "Reverse 345"}]]
    got = fn(prompts=prompts, completions=["21", "5 4 3 and more"])
    ensure_chat_template(tok)
    rm.eval()
    for p, c, g in zip(prompts, ["21", "5 4 3 and more"], got):
        ids, _ = tokenize_chat(tok, p + [{"role": "assistant", "content": c}])
        want = rm(input_ids=torch.tensor([ids.astype("int64")])).logits[0, 0].item()
        assert abs(g - want) < 1e-5


def test_critic_with_another_vocabulary_or_an_adapter_is_refused(tmp_path):
    """The critic scores the policy's token ids: a critic directory whose tokenizer has one token more is an
    error line; the same tokenizer (or a directory without one) passes; a LoRA adapter directory is refused."""
    import pytest
    from transformers import AutoTokenizer

    from conftest import TOKENIZER
    from llmtrain.errors import ConfigError
    from llmtrain.objectives.rl.critic import check_critic_dir

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.save_pretrained(tmp_path / "same")
    check_critic_dir(str(tmp_path / "same"), tok)
    check_critic_dir(str(tmp_path), tok)  # no tokenizer.json: nothing to compare
    other = AutoTokenizer.from_pretrained(TOKENIZER)
    other.add_tokens(["<extra_token>"])
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="rl.critic: .* has another tokenizer than the policy"):
        check_critic_dir(str(tmp_path / "other"), tok)
    (tmp_path / "same" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="rl.critic: .* is a LoRA adapter; .* merged/"):
        check_critic_dir(str(tmp_path / "same"), tok)


def flaky_verifier(prompts, completions, answer, **_):
    """A user's verifier: raises on a completion it cannot parse, None where it does not apply, NaN once."""
    out = []
    for c, a in zip(completions, answer):
        if "x" in c:
            raise ValueError(f"cannot parse {c!r}")
        out.append(None if c == "n" else float("nan") if c == "nan" else float(c == a))
    return out


def test_a_reward_function_failing_on_some_completions_costs_their_value_not_the_run():
    """Hand table: the batch call raises (on 'x'), so it is bisected; 'x' (raised), 'n' (None) and 'nan'
    get no value from flaky: 0 here, flagged, reported with the prompt's origin; the other function
    still counts for them. Nothing raises here (the rollout decides on all ranks' flags)."""
    from llmtrain.objectives.rl.rewards import RewardFn, exact_match, score

    fns = [RewardFn("flaky", flaky_verifier, 2.0), RewardFn("exact_match", exact_match, 0.5)]
    completions = ["12", "x", "n", "nan", "3"]
    answers = ["12", "x", "n", "nan", "4"]
    origins = [f"p.jsonl:{i + 1}" for i in range(5)]
    lines = []
    total, per_fn, missing = score(fns, [[]] * 5, completions, {"answer": answers}, origins, lines.append)
    assert per_fn["flaky"] == [1.0, 0.0, 0.0, 0.0, 0.0] and missing["flaky"] == [False, True, True, True, False]
    assert per_fn["exact_match"] == [1.0, 1.0, 1.0, 1.0, 0.0] and not any(missing["exact_match"])
    assert total == [2.5, 0.5, 0.5, 0.5, 0.0]
    assert len(lines) == 3 and lines[0].startswith("p.jsonl:2: flaky: raised ValueError: cannot parse 'x'")
    assert lines[1].startswith("p.jsonl:3: flaky: returned None") and lines[2].startswith("p.jsonl:4: flaky: returned nan")


def test_reward_retries_bisect_and_give_up_on_a_function_that_never_succeeds():
    from llmtrain.objectives.rl.rewards import MAX_FAILED_SINGLES, RewardFn, score

    calls = []

    def one_bad(prompts, completions, **_):  # 1 bad completion of 64: bisection, not 64 single calls
        calls.append(len(completions))
        if "bad" in completions:
            raise ValueError("bad")
        return [1.0] * len(completions)

    texts = [f"c{i}" for i in range(64)]
    texts[37] = "bad"
    _, per_fn, missing = score([RewardFn("one_bad", one_bad, 1.0)], [[]] * 64, texts, {})
    assert [i for i, m in enumerate(missing["one_bad"]) if m] == [37] and sum(per_fn["one_bad"]) == 63
    assert len(calls) == 1 + 2 * 6  # the full call, then both halves at each of log2(64) levels

    calls.clear()

    def broken(prompts, completions, **_):
        calls.append(len(completions))
        raise KeyError("answer")

    _, _, missing = score([RewardFn("broken", broken, 1.0)], [[]] * 64, texts, {})
    assert all(missing["broken"]) and sum(1 for n in calls if n == 1) == MAX_FAILED_SINGLES and len(calls) < 20
    # a wrong number of values is a failed call too: bisected down to calls that return one value each
    _, per_fn, missing = score([RewardFn("short", lambda prompts, completions, **_: [1.0], 1.0)], [[]] * 2, ["a", "b"], {})
    assert per_fn["short"] == [1.0, 1.0] and not any(missing["short"])


def test_missing_rewards_take_their_groups_mean_of_that_function():
    from llmtrain.objectives.rl.rewards import impute_group_means

    per_fn = {"a": [1.0, 0.0, 3.0, -2.0, 0.0, -6.0, 0.0, 0.0], "b": [1.0] * 8}
    missing = {"a": [False, True, False, False, True, False, True, True], "b": [False] * 8}
    total = impute_group_means(per_fn, missing, {"a": 0.5, "b": 2.0}, group=3)  # groups [0-2] [3-5] [6-7]
    assert per_fn["a"] == [1.0, 2.0, 3.0, -2.0, -4.0, -6.0, 0.0, 0.0]  # (1+3)/2, (-2-6)/2, none: 0
    assert total == [2.5, 3.0, 3.5, 1.0, 0.0, -1.0, 2.0, 2.0]


def test_pack_rows_fills_rows_in_order_up_to_the_capacity():
    from llmtrain.objectives.rl.rollout import pack_rows

    assert pack_rows([30, 30, 30, 50, 10, 90, 5], 64) == [[0, 1], [2], [3, 4], [5], [6]]  # 90 > 64: a row alone
    assert pack_rows([], 64) == [] and pack_rows([7], 7) == [[0]]


def test_dynamic_sampling_takes_each_slots_first_candidate_with_signal():
    from llmtrain.objectives.rl.rollout import select_candidates

    rewards = torch.tensor([[[1, 1], [0, 1], [1, 0]],   # slot 0: candidate 1 is the first with signal
                            [[0, 1], [1, 1], [0, 0]],   # slot 1: candidate 0 already has it
                            [[1, 1], [0, 0], [2, 2]]],  # slot 2: none: the first
                           dtype=torch.float64)
    assert select_candidates(rewards) == ([1, 0, 0], [2, 1, 0])
