"""Finiteness checks where data enters training: the latent cache (written and read), the collator, the loss.

One NaN in a cached latent spreads to every weight within a step or two, and `transformers` drops NaN losses from its
logs, so a run can end "successfully" with NaN weights. These checks stop at the first non-finite value and name the
sample (or the batch's samples and the step) it came from.
"""

import numpy as np
import torch


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; raised before the optimizer step, so no saved weight is affected."""


def describe_non_finite(values) -> str | None:
    """None when every value is finite, else e.g. `'3 NaN and 1 inf among 512 values'`."""
    values = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
    if not values.is_floating_point() or bool(torch.isfinite(values).all()):
        return None
    nan = int(torch.isnan(values).sum())
    inf = int(torch.isinf(values).sum())
    return f"{nan} NaN and {inf} inf among {values.numel()} values"


def check_finite_samples(values: torch.Tensor, uids, what: str) -> None:
    """Raise `ValueError` naming every sample (first dimension of `values`, ids `uids`) with a non-finite value."""
    bad = (~torch.isfinite(values.reshape(values.shape[0], -1))).any(dim=1)
    if bool(bad.any()):
        names = [uids[i] for i in bad.nonzero().flatten().tolist()]
        raise ValueError(
            f"{what} of sample(s) {names} are not finite ({describe_non_finite(values[bad])}). A degenerate mesh or a "
            "NaN in the input points gives this; fix or drop those samples."
        )


__all__ = ["NonFiniteLossError", "check_finite_samples", "describe_non_finite"]
