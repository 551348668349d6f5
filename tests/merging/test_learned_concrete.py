"""Concrete subspace merging as the authors' code builds it: masks rescaled by their mean, a sampled final mask."""
import math

import pytest
import torch

import merging
from test_learned import T, kw, toys

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/merging/conftest.py


def _theta(pre, fts, lam, mask):
    return {k: pre[k] + lam * sum(mask[k] * (f[k] - pre[k]) for f in fts) for k in pre}


def _entropy_sum(model, theta, data):
    """Σ_t mean entropy of softmax(head_t(tanh(body(x; θ)))) on each task's first batch, written out."""
    total = 0.0
    for i in range(T):
        x = data[f"t{i}"][0]
        h = torch.tanh(x @ theta["body.0.weight"].T + theta["body.0.bias"])
        z = torch.tanh(h @ theta["body.2.weight"].T + theta["body.2.bias"])
        p = torch.softmax(model.heads[f"t{i}"](z), dim=1)
        total += float(-(p * p.log()).sum(1).mean())
    return total


@pytest.mark.parametrize("rescale", [True, False])
def test_each_step_merges_with_the_mask_divided_by_its_mean(rescale):
    """Step 1's objective is the entropy of θ0 + λ Σ_t (m / mean(m)) ⊙ τ_t, m the step's Concrete draw
    σ((s + log u − log(1 − u)) / temperature) per tensor (u from a generator seeded with `seed`, logits 0)."""
    model, pre, fts, data = toys(dtype=torch.float64)
    r = merging.learn("concrete_ta", pre, fts, unlabeled=data, steps=1, lam=0.3, temperature=0.5, seed=7,
                      rescale=rescale, **kw(model))
    gen = torch.Generator().manual_seed(7)
    mask = {}
    for k in r.mask_probability:  # the logits' order: one draw per tensor in that order
        u = torch.rand(pre[k].shape, generator=gen, dtype=torch.float64).clamp_(1e-6, 1 - 1e-6)
        m = torch.sigmoid((torch.log(u) - torch.log1p(-u)) / 0.5)
        mask[k] = m / m.mean() if rescale else m
    with torch.no_grad():
        want = _entropy_sum(model, _theta(pre, fts, 0.3, mask), data)
    assert math.isclose(r.history[0]["objective"], want, rel_tol=1e-9)


def test_hard_final_mask_rescaled_by_hand():
    """final_mask=hard with rescale: merged = θ0 + λ Σ_t (m / mean(m)) ⊙ τ_t, m = 1[σ(s) > threshold]."""
    model, pre, fts, data = toys()
    r = merging.learn("concrete_ta", pre, fts, unlabeled=data, steps=10, lr=0.1, lam=0.4, final_mask="hard",
                      **kw(model))
    m = {k: (p > 0.5).float() for k, p in r.mask_probability.items()}
    assert all(0 < float(v.mean()) < 1 for v in m.values())  # the case rescaling changes
    scaled = {k: v / v.mean() for k, v in m.items()}
    for k, want in _theta(pre, fts, 0.4, scaled).items():
        torch.testing.assert_close(r.state_dict[k], want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r.mask[k], scaled[k])


def test_sampled_final_mask_has_unit_mean_and_is_what_the_result_applies():
    model, pre, fts, data = toys()
    r = merging.learn("concrete_ta", pre, fts, unlabeled=data, steps=3, lr=0.1, lam=0.3, **kw(model))
    assert r.hparams["final_mask"] == "sample" and r.hparams["rescale"] is True
    for k, m in r.mask.items():
        assert m.dtype == torch.float32 and bool((m > 0).all())  # a Concrete draw: no entry is exactly 0
        assert math.isclose(float(m.double().mean()), 1.0, rel_tol=1e-5)
    for k, want in _theta(pre, fts, 0.3, r.mask).items():
        torch.testing.assert_close(r.state_dict[k], want, rtol=1e-6, atol=1e-6)


def test_bernoulli_final_mask_is_binary_before_rescaling():
    model, pre, fts, data = toys()
    r = merging.learn("concrete_ta", pre, fts, unlabeled=data, steps=2, lr=0.1, final_mask="bernoulli",
                      rescale=False, **kw(model))
    assert all(set(m.unique().tolist()) <= {0.0, 1.0} for m in r.mask.values())


def test_the_final_draw_is_seeded_and_evaluating_it_changes_nothing():
    """The final mask has its own seeded stream: the same seed gives the same mask, and a callback that
    evaluates the final mask every step neither changes the learning nor sees another mask at the end."""
    model, pre, fts, data = toys()
    seen = {}

    def callback(step, state):
        seen[step] = {k: state[k].clone() for k in pre}

    a = merging.learn("concrete_ta", pre, fts, unlabeled=data, steps=3, lr=0.1, seed=4, **kw(model))
    b = merging.learn("concrete_ta", pre, fts, unlabeled=data, steps=3, lr=0.1, seed=4, callback=callback,
                      callback_every=1, **kw(model))
    for k in pre:
        assert torch.equal(a.state_dict[k], b.state_dict[k]) and torch.equal(a.mask[k], b.mask[k])
        assert torch.equal(seen[3][k], b.state_dict[k])
    c = merging.learn("concrete_ta", pre, fts, unlabeled=data, steps=3, lr=0.1, seed=5, **kw(model))
    assert not torch.equal(a.mask["body.0.weight"], c.mask["body.0.weight"])


@pytest.mark.parametrize("bad,match", [({"rescale": "false"}, "rescale must be true or false, got 'false'"),
                                       ({"final_mask": "soft"}, "unknown final_mask 'soft'; valid: sample, bernoulli, hard")])
def test_bad_mask_options_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        merging.learned.check_hparams("concrete_ta", bad)


def _lambdas(state, pre, fts):
    """λ (T,) of a task-wise merge θ = θ0 + Σ_t λ_t τ_t under an all-ones mask, by least squares."""
    A = torch.cat([torch.stack([(f[k] - pre[k]).reshape(-1) for f in fts], 1) for k in pre]).double()
    b = torch.cat([(state[k] - pre[k]).reshape(-1) for k in pre]).double()
    return torch.linalg.lstsq(A, b[:, None]).solution[:, 0]


def _inner_run(monkeypatch, inner, steps, final_steps, **lrs):
    """Concrete AdaMerging with a mask that keeps everything (logits 20, thresholded, unscaled), recording
    the λ each mask step's gradient was taken at: the coefficients after each of the mask phase's inner steps."""
    from merging.learned.adamerging import CoefficientLearner

    model, pre, fts, data = toys(dtype=torch.float64)
    seen, apply_step = [], CoefficientLearner.apply_step

    def recorded(self, step):
        apply_step(self, step)
        seen.append(self.coef.detach()[0].clone())

    monkeypatch.setattr(CoefficientLearner, "apply_step", recorded)
    r = merging.learn("concrete_adamerging", pre, fts, unlabeled=data, steps=steps, final_steps=final_steps,
                      granularity="task", inner=inner, **lrs, lr=1e-6, initial_logits=20.0,
                      final_mask="hard", rescale=False, **kw(model))
    return r, seen[:steps]


def test_reset_inner_adapts_lambda_from_init_each_outer_step(monkeypatch):
    """inner=reset: before every outer step λ is back at init (0.3), so each step's λ is ONE Adam step
    from it — the first exactly ±inner_lr, the later ones at most ~inner_lr away (Cauchy–Schwarz bounds
    Adam's bias-corrected step |m̂/√v̂| by 1.0068 at its 4th step) — while inner=continue accumulates them."""
    _, reset = _inner_run(monkeypatch, "reset", 4, 0, inner_lr=0.5)  # no final steps: coef_lr unread
    torch.testing.assert_close((reset[0] - 0.3).abs(), torch.full((T,), 0.5, dtype=torch.float64), atol=1e-4, rtol=0)
    assert all(float((lam - 0.3).abs().max()) <= 0.5 * 1.0068 for lam in reset)
    _, cont = _inner_run(monkeypatch, "continue", 4, 0, coef_lr=0.5)  # the same λ steps, carried on
    assert max(float((lam - 0.3).abs().max()) for lam in cont) > 0.5 * 1.01


def test_reset_final_adamerging_restarts_from_init_with_its_own_adam(monkeypatch):
    """The final AdaMerging starts again from init with a fresh Adam at coef_lr: after one step every λ
    is 0.3 ± coef_lr (Adam's first step), whatever the mask phase reached."""
    r, _ = _inner_run(monkeypatch, "reset", 3, 1, inner_lr=0.5, coef_lr=0.01)
    torch.testing.assert_close((r.coefficients - 0.3).abs(), torch.full((T,), 0.01, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    r0, _ = _inner_run(monkeypatch, "reset", 3, 0, inner_lr=0.5)
    assert torch.equal(r0.coefficients, torch.full((T,), 0.3, dtype=torch.float64))


@pytest.mark.parametrize("final_mask,dtype", [("hard", torch.uint8), ("bernoulli", torch.float32)])
def test_a_saved_mask_is_uint8_only_when_it_is_bool(final_mask, dtype, tmp_path):
    """Without rescaling both masks hold only 0 and 1, but only the thresholded one is bool: a Bernoulli draw is a
    float mask and is saved as one."""
    from safetensors.torch import load_file

    model, pre, fts, data = toys()
    res = merging.learn("concrete_ta", pre, fts, unlabeled=data, steps=2, rescale=False, final_mask=final_mask,
                        initial_logits=1.0, **kw(model))
    saved = load_file(str(res.save(tmp_path) / "coefficients.safetensors"))
    for k, m in res.mask.items():
        assert saved[f"mask/{k}"].dtype == dtype
        assert set(saved[f"mask/{k}"].unique().tolist()) <= {0, 1}
        torch.testing.assert_close(saved[f"mask/{k}"].float(), m.float(), rtol=0, atol=0)


@pytest.mark.parametrize("seed, stream", [(3, 3 + 0x9E3779B9), (-1, 0x9E3779B9 - 1), (2**64 - 1, 0x9E3779B9 - 1)])
def test_the_final_draws_seed_is_seed_plus_its_offset_modulo_2_64(seed, stream):
    """The final Concrete draw comes from the stream seed + 0x9E3779B9, reduced modulo 2**64 as torch reads a
    negative seed: the largest seed no longer overflows after every step has run, and names the stream of -1."""
    model, pre, fts, data = toys()
    r = merging.learn("concrete_ta", pre, fts, unlabeled=data, steps=0, seed=seed, **kw(model))
    g = torch.Generator().manual_seed(stream)
    for k in pre:  # logits 0 after no step: m = σ((log u − log(1 − u)) / 0.5), divided by its mean
        u = torch.rand(pre[k].shape, generator=g).clamp_(1e-6, 1 - 1e-6)
        m = torch.sigmoid((u.log() - torch.log1p(-u)) / 0.5)
        torch.testing.assert_close(r.mask[k], m / m.mean(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1, 1.5, True])
def test_a_seed_torch_cannot_take_is_named_before_anything_runs(seed):
    with pytest.raises(ValueError, match=r"^seed must be an int in \[-2\*\*63, 2\*\*64 - 1\], got "):
        merging.learned.check_hparams("adamerging", {"seed": seed})
    model, pre, fts, data = toys()
    with pytest.raises(ValueError, match=r"^seed must be an int in "):
        merging.learn("concrete_ta", pre, fts, unlabeled=data, steps=1, seed=seed, **kw(model))


@pytest.mark.parametrize("inner", ["reset", "continue"])
@pytest.mark.parametrize("final_steps", [0, 2])
def test_the_last_callback_sees_the_returned_model(inner, final_steps):
    """A callback sees the model the result would be were learning to stop at that step: at the last step,
    the returned state exactly — also with no coefficient steps after the mask phase, where under inner=reset
    the result holds λ = init and not the inner-adapted λ the last mask gradient was taken at."""
    model, pre, fts, data = toys()
    seen = {}

    def callback(step, state):
        seen[len(seen)] = {k: state[k].clone() for k in pre}

    lrs = dict(inner_lr=1.0) if inner == "reset" else dict(coef_lr=0.05)
    if final_steps and inner == "reset":
        lrs["coef_lr"] = 0.05
    r = merging.learn("concrete_adamerging", pre, fts, unlabeled=data, steps=3, final_steps=final_steps, lr=0.1,
                      inner=inner, callback=callback, callback_every=1, **lrs, **kw(model))
    assert len(seen) == 3 + final_steps
    for k in pre:
        assert torch.equal(seen[len(seen) - 1][k], r.state_dict[k]), k
    if inner == "reset" and final_steps == 0:  # by hand: the final mask at λ = init, not at the adapted λ
        for k in pre:
            expect = pre[k] + 0.3 * sum(r.mask[k] * (f[k] - pre[k]) for f in fts)
            torch.testing.assert_close(seen[2][k], expect, rtol=1e-6, atol=1e-6)
