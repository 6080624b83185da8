"""`MISTConfig`: which weights MIST may touch, how many of their entries, and how they are tuned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ._peft_compat import MistPeftType

SELECTIONS = ("magnitude", "random", "mi_fisher", "fisher")
GRANULARITIES = ("per_tensor", "global")


def check_cross_task(frozen_quantile: float | None, overlap_decay: float | None, where: str) -> None:
    """The one range check of the reference's cross-task parameters (`MISTConfig` and `CrossTaskState`)."""
    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if frozen_quantile is not None and not (number(frozen_quantile) and 0.0 <= frozen_quantile <= 1.0):
        raise ValueError(f"{where}.frozen_quantile={frozen_quantile!r} is invalid: it must be in [0, 1] "
                         "(reference: 1.0 or 0.9995), or None to switch it off.")
    if overlap_decay is not None and not (number(overlap_decay) and 0.0 < overlap_decay <= 1.0):
        raise ValueError(f"{where}.overlap_decay={overlap_decay!r} is invalid: it must be in (0, 1] "
                         "(reference: 0.9), or None to switch it off.")


@dataclass
class MISTConfig(PeftConfig):
    """Configuration of a MIST adapter (sparse deltas over selected entries of frozen base weights).

    Defaults follow the "Decisions" table of the MIST specification: 5% of each targeted weight
    (`density=0.05`, per tensor), 90% gradient dropout without rescaling, selection by the MI-Fisher score.
    The data-free selections (`"magnitude"`, `"random"`) pick the entries inside `get_peft_model` (never while
    loading a checkpoint); `"mi_fisher"` entries are chosen by MIST's scoring pass (`train_mist`, `MISTTrainer`,
    `select_mi_fisher`); `"fisher"` entries are chosen inside any training loop after its first `score_steps`
    optimizer steps, from the squared gradients of the loop's own loss.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (suffix match), a regex, or 'all-linear'. None means 'all-linear' "
            "(every Linear/Conv1D except the output head), like the reference, which tunes every weight matrix."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex to leave untouched."}
    )
    density: float = field(
        default=0.05,
        metadata={"help": "Fraction of each targeted weight that may change, 0 < density <= 1 (paper: 0.05; "
                  "the authors' shipped configs: 0.10)."},
    )
    granularity: Literal["per_tensor", "global"] = field(
        default="per_tensor",
        metadata={"help": "'per_tensor': top-density of every weight (reference); 'global': one top-k over all "
                  "targeted weights together."},
    )
    selection: Literal["magnitude", "random", "mi_fisher", "fisher"] = field(
        default="mi_fisher",
        metadata={"help": "How entries are chosen: 'mi_fisher' (MIST; needs MIST's scoring pass on data), "
                  "'fisher' (squared gradients of your own loss during the first `score_steps` optimizer steps "
                  "of any training loop), 'magnitude' (largest |W|) or 'random' (seeded)."},
    )
    score_steps: int = field(
        default=8,
        metadata={"help": "selection='fisher': optimizer steps whose squared gradients score the entries before "
                  "tuning starts (the values do not move during them)."},
    )
    grad_drop: float = field(
        default=0.9,
        metadata={"help": "Probability that a selected entry gets no gradient in a step, 0 <= grad_drop < 1."},
    )
    rescale_kept_grads: bool = field(
        default=False,
        metadata={"help": "Scale kept gradients by 1/(1-grad_drop) (inverted dropout). The reference does not."},
    )
    tune_biases_and_norms: bool = field(
        default=False,
        metadata={"help": "Also tune every bias of the targeted layers and the weight and bias of every nn.LayerNorm "
                  "/ nn.RMSNorm (outside `exclude_modules`) as dense deltas: all their entries are selectable, never "
                  "scored, and the gradient dropout still applies. The reference does this; off by default "
                  "(MIST_SPEC 'Decisions')."},
    )
    frozen_quantile: float | None = field(
        default=None,
        metadata={"help": "selection='mi_fisher' over a sequence of tasks (the reference's frozen set, MIST_SPEC "
                  "§3.7): after each task, the entries at or above this per-tensor quantile of the task's scores "
                  "are frozen, and their scores are zeroed before every later task's selection (reference: 1.0, "
                  "the maximum plus ties, or 0.9995). The set lives in a `scoring.CrossTaskState` that you carry "
                  "from task to task (`cross_task=` of `train_mist`, `MISTTrainer`, `select_mi_fisher`). None: off."},
    )
    overlap_decay: float | None = field(
        default=None,
        metadata={"help": "selection='mi_fisher' over a sequence of tasks (MIST_SPEC §3.7): a selected entry's "
                  "gradient is multiplied by overlap_decay**C, C the number of earlier tasks that selected it "
                  "(reference: 0.9), counted in the same carried `CrossTaskState`. None: off."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random selection and the gradient-dropout draws."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained densely and saved whole (e.g. a classifier head)."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list, used with `layers_to_transform`."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MistPeftType.MIST
        if self.target_modules is None:
            self.target_modules = "all-linear"
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    @property
    def uses_cross_task(self) -> bool:
        """Whether the reference's cross-task state (frozen set, overlap decay) is on for this adapter."""
        return self.frozen_quantile is not None or self.overlap_decay is not None

    def _validate(self) -> None:
        def bad(name: str, value: object, valid: str) -> ValueError:
            return ValueError(f"MISTConfig.{name}={value!r} is invalid: {valid}.")

        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) or not 0 < self.density <= 1:
            raise bad("density", self.density, "it must be a number with 0 < density <= 1 (e.g. 0.05)")
        if self.granularity not in GRANULARITIES:
            raise bad("granularity", self.granularity, f"choose one of {GRANULARITIES}")
        if self.selection not in SELECTIONS:
            raise bad("selection", self.selection, f"choose one of {SELECTIONS}")
        if isinstance(self.grad_drop, bool) or not isinstance(self.grad_drop, (int, float)) or not (
            0 <= self.grad_drop < 1
        ):
            raise bad("grad_drop", self.grad_drop, "it must be a number with 0 <= grad_drop < 1 (e.g. 0.9)")
        if not isinstance(self.rescale_kept_grads, bool):
            raise bad("rescale_kept_grads", self.rescale_kept_grads, "it must be True or False")
        if not isinstance(self.tune_biases_and_norms, bool):
            raise bad("tune_biases_and_norms", self.tune_biases_and_norms, "it must be True or False")
        if isinstance(self.score_steps, bool) or not isinstance(self.score_steps, int) or self.score_steps < 1:
            raise bad("score_steps", self.score_steps, "it must be an integer >= 1")
        if self.selection == "fisher" and self.granularity == "global":
            raise bad(
                "granularity", self.granularity,
                "selection='fisher' runs inside your training loop, whose optimizer exists before the entries are "
                "chosen, and a global top-k sizes each layer's values only then; use granularity='per_tensor', or "
                "selection='mi_fisher' through train_mist / MISTTrainer",
            )
        check_cross_task(self.frozen_quantile, self.overlap_decay, "MISTConfig")
        if self.uses_cross_task and self.selection != "mi_fisher":
            raise bad("selection", self.selection, "frozen_quantile and overlap_decay act on MIST's MI-Fisher "
                      "scores across tasks; use selection='mi_fisher', or leave both None")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise bad("seed", self.seed, "it must be an integer")
        if self.layers_pattern and self.layers_to_transform is None:
            raise bad("layers_pattern", self.layers_pattern, "it only works together with `layers_to_transform`")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            if self.target_modules.lower() != "all-linear":
                raise bad(
                    "layers_to_transform", self.layers_to_transform,
                    "it cannot be combined with a regex `target_modules`; list the module names instead",
                )
