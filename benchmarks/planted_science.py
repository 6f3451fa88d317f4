"""Planted bugs in the science code (issue 21): statistics, drift, application pipelines,
sampling, the attribute lens, Patchscopes and the web readout tabs, each with the test file that
must catch it. :mod:`planted_bugs` merges :data:`SCIENCE_PLANTS` into its table; run them as::

    python benchmarks/planted_bugs.py spearman_is_pearson      # or any other name below
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable


def _spearman_is_pearson() -> None:
    """Causal fidelity (and the drift correlation) take Pearson's r of the values, not their ranks."""
    from depthlens.analysis import causal
    from depthlens.analysis.causal import fidelity

    def pearson(x, y):
        x, y = x.double() - x.double().mean(-1, keepdim=True), y.double() - y.double().mean(-1, keepdim=True)
        return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))

    fidelity.spearman = causal.spearman = pearson


def _pc_removal_skipped() -> None:
    """The covariance similarity never removes the top principal components."""
    from depthlens.analysis import drift
    from depthlens.analysis.drift import covariance

    covariance.remove_top_components = drift.remove_top_components = lambda matrix, components: matrix


def _transfer_transposed() -> None:
    """The transfer matrices come out transposed (rows are states, columns translators)."""
    from depthlens.analysis import drift
    from depthlens.analysis.drift import transfer

    real = transfer.transfer_matrix

    def transposed(*args, **kwargs):
        found = real(*args, **kwargs)
        return dataclasses.replace(found, ce=found.ce.T.contiguous(), kl=found.kl.T.contiguous())

    transfer.transfer_matrix = drift.transfer_matrix = transposed


def _penalty_wrong_axis() -> None:
    """The transfer penalty subtracts each row's diagonal entry instead of each column's."""
    from depthlens.analysis.drift.transfer import Transfer

    Transfer.ce_penalty = property(lambda self: self.ce - self.ce.diagonal().unsqueeze(1))
    Transfer.kl_penalty = property(lambda self: self.kl - self.kl.diagonal().unsqueeze(1))


def _detector_method(flip_labels: bool = False, fit_held_out: bool = False) -> None:
    """Replace the injection pipeline's per-method evaluation by one with the given bug."""
    import importlib

    import numpy as np

    injection = importlib.import_module("depthlens.analysis.applications.injection")

    def method(name, readout, detector, clean, injected, splits, resamples, benign=None, options=None):
        attack, control = [], []
        for seed, train in enumerate(splits):
            held_out = np.setdiff1d(np.arange(len(clean)), train)
            test = np.concatenate([clean[held_out], injected, *([] if benign is None else [benign])])
            scores = injection.fit_score(detector, clean[held_out if fit_held_out else train], test, seed,
                                         **(options or {}))
            clean_scores, attacked = scores[: len(held_out)], scores[len(held_out): len(held_out) + len(injected)]
            pair = (attacked, clean_scores) if flip_labels else (clean_scores, attacked)
            attack.append(injection._against_clean(*pair, seed, resamples))
            if benign is not None:
                control.append(injection._against_clean(clean_scores, scores[len(held_out) + len(injected):], seed,
                                                        resamples))
        low, high = injection.pooled_interval([samples for _, samples, _ in attack])
        result = injection.MethodResult(name, readout, detector, float(np.mean([a[0] for a in attack])), low, high,
                                        [a[0] for a in attack], attack[0][2])
        if control:
            result.benign = (float(np.mean([c[0] for c in control])),
                             *injection.pooled_interval([samples for _, samples, _ in control]))
        return result

    injection._method = method


def _injection_labels_flipped() -> None:
    """Injected examples are labelled 0 and clean ones 1: every AUROC becomes 1 − AUROC."""
    _detector_method(flip_labels=True)


def _detector_fit_on_held_out() -> None:
    """Each detector is fitted on the held-out clean examples it then scores."""
    _detector_method(fit_held_out=True)


def _overthinking_unpermuted() -> None:
    """The "permuted" demonstrations of the overthinking pipeline keep their right labels."""
    import importlib

    overthinking = importlib.import_module("depthlens.analysis.applications.overthinking")
    real = overthinking.few_shot
    overthinking.few_shot = lambda task, shots, *, shift=0, **kwargs: real(task, shots, **kwargs)


def _depth_off_by_one() -> None:
    """depth_vs_training reads each layer's prediction from the layer above (depth one too small)."""
    import importlib

    import torch

    depth = importlib.import_module("depthlens.analysis.applications.depth")
    real = depth.settling_index

    def settling_index(predictions):
        p = torch.as_tensor(predictions)
        caller = sys._getframe(1)
        if caller.f_code.co_name == "depth_vs_training" and "learned" in caller.f_locals:  # the readouts' depth
            return real(torch.cat([p[1:], p[-1:]]))
        return real(p)

    depth.settling_index = settling_index


def _temperature_ignored() -> None:
    """Sampling draws from softmax(logits) whatever the temperature (0 still means greedy)."""
    from depthlens.analysis import generate

    real = generate.sample

    def sample(logits, *, temperature=0.0, **kwargs):
        return real(logits, temperature=1.0 if temperature > 0 else 0.0, **kwargs)

    generate.sample = sample


def _low_rank_loses_beta() -> None:
    """The low-rank attribute lens is built with β = 1."""
    from depthlens.lenses.attribute import AttributeLens

    real = AttributeLens.low_rank

    def low_rank(self, rank):
        return real(self.with_beta(1.0), rank)

    AttributeLens.low_rank = low_rank


def _faithfulness_wrong_position() -> None:
    """Faithfulness reads the attribute lens at the prompt's last token, not the subject's."""
    from depthlens.lenses import attribute

    real = attribute.subject_position

    def subject_position(tokenizer, text, subject):
        callers = (sys._getframe(1).f_code.co_name, sys._getframe(2).f_code.co_name)
        if "faithfulness" in callers:
            return len(tokenizer(text).input_ids) - 1
        return real(tokenizer, text, subject)

    attribute.subject_position = subject_position


def _bias_only_lens() -> None:
    """The attribute lens ignores the state: it is only its bias b_l."""
    from depthlens.lenses.attribute import AttributeLens

    AttributeLens.transform = lambda self, hidden, layer: self.bias[layer].expand(*hidden.shape[:-1], -1).clone()


def _dead_beta_slider() -> None:
    """The attribute tab's β slider changes the message but not the lens."""
    from depthlens.apps.web_readouts import Readouts
    from depthlens.lenses.attribute import AttributeLens

    real, with_beta = Readouts.attribute, AttributeLens.with_beta

    def attribute(self, relation_name, n_train, beta, text):
        AttributeLens.with_beta = lambda lens, value: lens
        try:
            return real(self, relation_name, n_train, beta, text)
        finally:
            AttributeLens.with_beta = with_beta

    Readouts.attribute = attribute


def _unshared_lock() -> None:
    """The readout tabs make a lock of their own instead of holding the app's."""
    from depthlens.apps.web_readouts import Readouts

    real = Readouts.__init__

    def init(self, model, tokenizer, lenses, *, max_tokens=64, lock=None):
        real(self, model, tokenizer, lenses, max_tokens=max_tokens, lock=None)

    Readouts.__init__ = init


def _patch_every_step() -> None:
    """Patchscope generation writes the patch at every step, not once in the prefill."""
    from depthlens.analysis import patchscope
    from depthlens.model.hooks import replace

    patchscope.replace = lambda point, value, positions=None, *, once=False: replace(point, value, positions)


def _top_p_one_short() -> None:
    """Top-p drops the token that makes the kept probability reach p (the nucleus is one short)."""
    import torch

    from depthlens.analysis import generate

    real = generate.sample

    def sample(logits, *, temperature=0.0, top_k=None, top_p=None, generator=None):
        if top_p is None or temperature == 0:
            return real(logits, temperature=temperature, top_k=top_k, generator=generator)
        scores = logits.float() / temperature
        ordered, index = scores.sort(-1, descending=True)
        reached = ordered.softmax(-1).cumsum(-1) >= top_p
        reached[..., 0] = False
        scores = torch.full_like(scores, float("-inf")).scatter(-1, index, ordered.masked_fill(reached, float("-inf")))
        return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]

    generate.sample = sample


def _model_kl_reversed() -> None:
    """Causal fidelity's model side is KL(ablated ‖ clean) instead of KL(clean ‖ ablated)."""
    from depthlens.analysis.causal import fidelity

    real = fidelity.kl
    fidelity.kl = lambda p, q: real(q, p)


def _calibrated_ties_count() -> None:
    """Calibrated accuracy counts a gold probability equal to its threshold as predicted."""
    import importlib

    import numpy as np

    overthinking = importlib.import_module("depthlens.analysis.applications.overthinking")

    def calibrated_accuracy(probs, gold):
        n = probs.shape[-1]
        thresholds = np.quantile(probs, (n - 1) / n, axis=0)
        gold_probs = np.take_along_axis(probs, gold[:, None, None], -1)[..., 0]
        return (gold_probs >= thresholds[:, gold].T).mean(0)

    overthinking.calibrated_accuracy = calibrated_accuracy
    from depthlens.analysis import applications
    applications.calibrated_accuracy = calibrated_accuracy


def _injection_may_ask_for_gold() -> None:
    """The injected instruction may ask for the right answer (drawn from every choice)."""
    import importlib
    import random

    injection = importlib.import_module("depthlens.analysis.applications.injection")
    real = injection.inject

    def inject(example, cue, *, seed=0, where=""):
        done = real(example, cue, seed=seed, where=where)
        pick = random.Random(f"{seed}:{example.id}").randrange(len(example.choices))
        wrong = [c.strip() for i, c in enumerate(example.choices) if i != example.gold]
        asked = next(w for w in wrong if f'"{w}"' in done.prompt)
        return dataclasses.replace(done, prompt=done.prompt.replace(f'"{asked}"', f'"{example.choices[pick].strip()}"'))

    injection.inject = inject
    from depthlens.analysis import applications
    applications.inject = inject


def _spearman_ties_by_order() -> None:
    """Spearman's ranks break ties by order, not by averaging (the bug fixed in issue 21: on a
    symmetric similarity matrix every value is tied, and ρ depended on the pairs' order)."""
    from depthlens.analysis.causal import fidelity

    fidelity.ranks = lambda values: values.argsort(-1).argsort(-1).double()


def _affine_map_uncentred() -> None:
    """The Patchscope's least-squares map is fitted without centring (its intercept is lost)."""
    import torch

    from depthlens.analysis import patchscope

    def fit_affine_map(source, target, *, ridge=1e-3):
        x, y = source.double(), target.double()
        gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=torch.float64)
        return patchscope.AffineMap(torch.linalg.solve(gram, x.T @ y).T, torch.zeros(y.shape[1]))

    patchscope.fit_affine_map = fit_affine_map


def _benign_control_attacks() -> None:
    """The injection's benign control inserts the attack itself."""
    from depthlens.analysis.applications import injection

    injection.neutral_text = lambda length: injection.ATTACK.format(answer="yes")[:length]


def _rho_draws_pooled_penalty() -> None:
    """The drift ρ bootstrap resamples the covariances but keeps the pooled transfer penalty."""
    from depthlens.analysis.drift import transfer

    transfer.Transfer.resampled_ce_penalty = lambda self, counts: self.ce_penalty


def _srm_ridge_always_relative() -> None:
    """The SRM ignores ``relative=False``: the authors' fixed ridge becomes 10⁻³ × the mean variance."""
    from depthlens.analysis.applications import anomaly

    init = anomaly.SRM.__init__

    def relative_init(self, ridge=1e-2, *, relative=True):
        init(self, ridge, relative=True)

    anomaly.SRM.__init__ = relative_init


def _log_odds_reversed() -> None:
    """Binary tasks' features are log p(choice 0) − log p(choice 1), the log-odds with the sign flipped."""
    from depthlens.analysis.applications import features

    original = features.ChoiceScores.features

    def reversed_features(self, readout):
        values = original(self, readout)
        return -values if self.feature_kind == "log-odds" else values

    features.ChoiceScores.features = reversed_features


def _direction_pairs_broken() -> None:
    """Fidelity's interval over directions draws the model side's directions apart from the readout
    side's, so a resample pairs one direction's readout KL with another's model KL."""
    import torch

    from depthlens.analysis import causal
    from depthlens.analysis.causal import fidelity
    from depthlens.stats.bootstrap import interval, resample_indices

    def unpaired(readout_kl, model_kl, *, resamples=1000, seed=0):
        r, m = (torch.tensor([round(round(float(v), 6) / fidelity.RESOLUTION) for v in side], dtype=torch.float64)
                for side in (readout_kl, model_kl))
        samples = fidelity.spearman(r[resample_indices(len(r), resamples, seed)],
                                    m[resample_indices(len(m), resamples, seed + 1)])
        return interval(samples[torch.isfinite(samples)])

    fidelity.direction_interval = causal.direction_interval = unpaired


SCIENCE_PLANTS: dict[str, tuple[Callable[[], None], list[str]]] = {
    "direction_pairs_broken": (_direction_pairs_broken, ["tests/test_oracle_causal.py", "tests/test_mutants_causal.py"]),
    "benign_control_attacks": (_benign_control_attacks, ["tests/test_mutants_applications.py"]),
    "srm_ridge_always_relative": (_srm_ridge_always_relative, ["tests/test_injection_authors.py"]),
    "log_odds_reversed": (_log_odds_reversed, ["tests/test_injection_authors.py"]),
    "rho_draws_pooled_penalty": (_rho_draws_pooled_penalty, ["tests/test_drift_interval.py"]),
    "spearman_is_pearson": (_spearman_is_pearson, ["tests/test_oracle_causal.py", "tests/test_oracle_drift.py"]),
    "pc_removal_skipped": (_pc_removal_skipped, ["tests/test_oracle_drift.py"]),
    "transfer_transposed": (_transfer_transposed, ["tests/test_oracle_drift.py"]),
    "penalty_wrong_axis": (_penalty_wrong_axis, ["tests/test_oracle_drift.py"]),
    "injection_labels_flipped": (_injection_labels_flipped, ["tests/test_oracle_applications.py"]),
    "detector_fit_on_held_out": (_detector_fit_on_held_out, ["tests/test_oracle_applications.py"]),
    "overthinking_demos_unpermuted": (_overthinking_unpermuted, ["tests/test_oracle_applications.py"]),
    "depth_vs_training_off_by_one": (_depth_off_by_one, ["tests/test_oracle_applications.py"]),
    "temperature_ignored": (_temperature_ignored, ["tests/test_oracle_generate.py"]),
    "low_rank_loses_beta": (_low_rank_loses_beta, ["tests/test_oracle_attribute.py"]),
    "faithfulness_wrong_position": (_faithfulness_wrong_position, ["tests/test_oracle_attribute.py"]),
    "attribute_lens_is_its_bias": (_bias_only_lens, ["tests/test_oracle_attribute.py"]),
    "beta_slider_dead": (_dead_beta_slider, ["tests/test_oracle_attribute.py"]),
    "readout_tabs_own_lock": (_unshared_lock, ["tests/test_oracle_attribute.py"]),
    "patchscope_patch_every_step": (_patch_every_step, ["tests/test_oracle_generate.py"]),
    "top_p_one_short": (_top_p_one_short, ["tests/test_oracle_generate.py"]),
    "fidelity_model_kl_reversed": (_model_kl_reversed, ["tests/test_oracle_causal.py"]),
    "calibrated_accuracy_counts_ties": (_calibrated_ties_count, ["tests/test_applications.py"]),
    "injection_may_ask_for_gold": (_injection_may_ask_for_gold, ["tests/test_applications.py"]),
    "affine_map_uncentred": (_affine_map_uncentred, ["tests/test_patchscope.py"]),
    "spearman_ties_by_order": (_spearman_ties_by_order, ["tests/test_oracle_causal.py", "tests/test_oracle_drift.py"]),
}
