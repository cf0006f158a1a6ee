"""`TenantLimits`: what one tenant may use, validated once for the tenant store and the config file."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

ALL_MODELS = "*"


class InvalidLimit(ValueError):
    """A tenant limit with a bad value; `field` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.reason = message


@dataclass(kw_only=True)
class TenantLimits:
    """What a tenant may use, checked when built: 0 means unlimited; allowed_models ["*"] means
    every model it can see. The tenant store and the config file's [[tenants]] share it."""

    allowed_models: list[str] = field(default_factory=lambda: [ALL_MODELS])
    max_concurrent: int = 0
    tokens_per_minute: int = 0
    memory_quota_bytes: int = 0
    admin: bool = False
    weight: float = 1.0  # its share of a shared model against the other busy tenants (2 = twice the service)

    def __post_init__(self) -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not 0 < self.weight <= 1e6:
            raise InvalidLimit("weight", f"must be a number > 0 (a share; 1 = the default), got {self.weight!r}")
        self.weight = float(self.weight)
        for name in ("max_concurrent", "tokens_per_minute", "memory_quota_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidLimit(name, f"must be an integer >= 0 (0 = unlimited), got {value!r}")
        if not isinstance(self.admin, bool):
            raise InvalidLimit("admin", f"must be true or false, got {self.admin!r}")
        models = self.allowed_models
        if isinstance(models, str) or not isinstance(models, (list, tuple)) or not models \
                or not all(isinstance(m, str) and m.strip() for m in models):
            raise InvalidLimit("allowed_models", f"must be a non-empty list of model names or ['*'], got {models!r}")
        models = list(dict.fromkeys(m.strip() for m in models))
        if ALL_MODELS in models and len(models) > 1:
            raise InvalidLimit("allowed_models", f"'*' alone means every model; drop the others from {models!r}")
        self.allowed_models = models

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(TenantLimits))

    def limits(self) -> TenantLimits:
        """Just the limits (of a Tenant or a TenantSpec)."""
        return TenantLimits(**{name: getattr(self, name) for name in TenantLimits.names()})

    def replace(self, **changes: Any) -> TenantLimits:
        """These limits with some changed, validated again; an unknown name is a ValueError."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise ValueError(f"unknown tenant limit(s) {', '.join(unknown)}; known: {', '.join(self.names())}")
        return TenantLimits(**{**vars(self.limits()), **changes})
