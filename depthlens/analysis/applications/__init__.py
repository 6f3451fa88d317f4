"""Applications of prediction trajectories (Belrose et al. 2023, §5), on real task data offline.

- :mod:`~depthlens.analysis.applications.tasks` / :mod:`~depthlens.analysis.applications.builtin` —
  multiple-choice task data: local files, hub datasets, built-in offline tasks;
- :mod:`~depthlens.analysis.applications.features` — per-layer answer-choice log-likelihoods;
- :mod:`~depthlens.analysis.applications.injection` — prompt-injection detection (AUROC);
- :mod:`~depthlens.analysis.applications.anomaly` — detectors and anomaly scores of free texts;
- :mod:`~depthlens.analysis.applications.depth` — prediction depth, iteration learned, Spearman ρ (per token,
  or per example over answer choices with a bootstrap interval), a next-word task from plain text;
- :mod:`~depthlens.analysis.applications.overthinking` — calibrated accuracy with permuted demos.
"""

from depthlens.analysis.applications.anomaly import DETECTORS, SRM, fit_score, score_texts, text_features
from depthlens.analysis.applications.builtin import BUILTIN_TASKS, builtin_task, fetch_task_data, task_data_dir
from depthlens.analysis.applications.depth import (
    depth_grid,
    depth_vs_training,
    example_correlation,
    example_depths,
    iteration_learned,
    next_word_examples,
    settling_index,
    spearman,
    spearman_interval,
    token_depths,
)
from depthlens.analysis.applications.features import ChoiceScores, score_choices
from depthlens.analysis.applications.injection import detect_injections, evaluate_detectors, inject
from depthlens.analysis.applications.load import load_task
from depthlens.analysis.applications.overthinking import calibrated_accuracy, critical_layer, overthinking
from depthlens.analysis.applications.tasks import Example, Task, few_shot

__all__ = [
    "BUILTIN_TASKS", "DETECTORS", "SRM", "ChoiceScores", "Example", "Task", "builtin_task", "calibrated_accuracy",
    "critical_layer", "depth_grid", "depth_vs_training", "detect_injections", "evaluate_detectors",
    "example_correlation", "example_depths", "fetch_task_data", "few_shot", "fit_score", "inject", "iteration_learned",
    "load_task", "next_word_examples", "overthinking", "score_choices", "score_texts", "settling_index", "spearman",
    "spearman_interval", "task_data_dir", "text_features", "token_depths",
]
