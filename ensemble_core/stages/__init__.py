"""The six stages of a run, one module each, in the README's numbering (docs/design.md):

    1. gradient features     gradient_features, linearity                    stage1_features
    2. subset regressions    save_subset_plan, fit_subsets                   stage2_subsets
    3. affinity and groups   affinity_and_groups, plan_baselines             stage3_groups
    4. group adapters        train_group(s), save_theta_star                 stage4_adapters
    5. boosting and weights  score_members, boost_group, record_boosting,     stage5_boosting
                             fit_weights
    6. evaluation            evaluate, evaluate_baselines, finish,           stage6_evaluation
                             publish_version

Each stage function takes the :class:`run.Run` and the records of the stages before it, writes
its files through the run directory (``rundir.RunDir``) and returns a record (``records``);
:func:`declaration.stage` says what its result depends on (its cache key). What the stages are
given — the subset plan, the scoring plans — is made by ``planning``; the order they run in,
with Algorithm 2's boosting loop, is ``ensemble_core.algorithm2``.
"""
from .declaration import MODEL, PLANNING, PROJECTION, STAGES, Stage, stage
from .planning import (boost_score_plan, by_task, compute_summary, plan_batches, plan_subsets,
                       previous_plan, score_plans, scores_key, scores_of, subset_batches,
                       subset_plan, test_plans)
from .stage1_features import (estimation_examples, gradient_features, gradient_features_pack,
                              linearity, scored_examples)
from .stage2_subsets import fit_subsets, save_subset_plan
from .stage3_groups import affinity_and_groups, plan_baselines
from .stage4_adapters import adapter_record, save_theta_star, train_group, train_groups
from .stage5_boosting import (boost_group, fit_weights, group_losses, read_scores,
                              record_boosting, score_members)
from .stage6_evaluation import evaluate, evaluate_baselines, finish, publish_version

__all__ = ["MODEL", "PLANNING", "PROJECTION", "STAGES", "Stage", "stage", "boost_score_plan",
           "by_task", "compute_summary", "plan_batches", "plan_subsets", "previous_plan",
           "score_plans", "scores_key", "scores_of", "subset_batches", "subset_plan",
           "test_plans", "estimation_examples", "gradient_features", "gradient_features_pack",
           "linearity",
           "scored_examples", "fit_subsets", "save_subset_plan", "affinity_and_groups",
           "plan_baselines", "adapter_record", "save_theta_star", "train_group", "train_groups",
           "boost_group",
           "fit_weights", "group_losses", "read_scores", "record_boosting", "score_members",
           "evaluate", "evaluate_baselines", "finish", "publish_version"]
