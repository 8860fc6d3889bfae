from fabloop.core.policies import RetrainPolicy
from fabloop.core.validation import judge_challenger


def test_first_model_only_needs_the_floor() -> None:
    policy = RetrainPolicy(min_roc_auc=0.7)
    assert judge_challenger({"roc_auc": 0.75}, None, policy).passed
    assert not judge_challenger({"roc_auc": 0.65}, None, policy).passed


def test_regression_beyond_tolerance_is_rejected() -> None:
    policy = RetrainPolicy(min_roc_auc=0.5, max_regression=0.01)
    verdict = judge_challenger({"roc_auc": 0.80}, {"roc_auc": 0.85}, policy)
    assert not verdict.passed and "regresses" in verdict.summary()
    assert judge_challenger({"roc_auc": 0.845}, {"roc_auc": 0.85}, policy).passed


def test_required_gain() -> None:
    policy = RetrainPolicy(min_roc_auc=0.5, required_gain=0.02)
    assert not judge_challenger({"roc_auc": 0.86}, {"roc_auc": 0.85}, policy).passed
    assert judge_challenger({"roc_auc": 0.88}, {"roc_auc": 0.85}, policy).passed


def test_nan_auc_never_passes() -> None:
    assert not judge_challenger({"roc_auc": float("nan")}, None, RetrainPolicy()).passed
