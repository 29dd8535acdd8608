"""The router study: the same model trained with each routing method on the same budget, ranked on real data.

>>> from smoe.study import StudyConfig, run_study
>>> result = run_study(StudyConfig(task="lm", quick=True, routers=["token_choice", "expert_choice"]))  # doctest: +SKIP
"""

from smoe.study.report import format_leaderboard, leaderboard_markdown, leaderboard_rows, write_report
from smoe.study.runner import STUDY_TASKS, StudyConfig, StudyResult, StudyRun, run_study, study_budget
from smoe.study.variants import DEFAULT_ROUTERS, NAMED_VARIANTS, StudyVariant, resolve_variants, variant_overrides

__all__ = [
    "StudyConfig",
    "StudyResult",
    "StudyRun",
    "run_study",
    "study_budget",
    "STUDY_TASKS",
    "StudyVariant",
    "NAMED_VARIANTS",
    "DEFAULT_ROUTERS",
    "resolve_variants",
    "variant_overrides",
    "leaderboard_rows",
    "format_leaderboard",
    "leaderboard_markdown",
    "write_report",
]
