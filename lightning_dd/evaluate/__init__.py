"""The student evaluator shared by every image method."""
from lightning_dd.evaluate.student import EvalResult, StudentModule, check_set, evaluate_set

__all__ = ["EvalResult", "StudentModule", "check_set", "evaluate_set"]
