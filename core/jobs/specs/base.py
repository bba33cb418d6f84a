"""What every job kind's spec shares: one pydantic model that is the route's body
(or its public part), the job row's ``params`` and what the handler reads back.

Imports nothing heavy: the API and the scheduler validate with it.
"""

from __future__ import annotations

import types
from typing import Any, ClassVar, Self, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from core.db.models import Job, JobKind
from core.settings import Settings


def _is_number(annotation: Any) -> bool:
    """int or float (optional or not); bool is an int to Python, not to JSON."""
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_is_number(arg) for arg in get_args(annotation))
    return annotation in (int, float)


def _is_integer(annotation: Any) -> bool:
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_is_integer(arg) for arg in get_args(annotation))
    return annotation is int


class NumbersAreNumbers(BaseModel):
    """pydantic's lax mode takes true for 1 and "3" for 3; JSON Schema does not, so
    a body the OpenAPI document calls invalid would be accepted. Number fields here
    take JSON numbers only (3.0 is still the integer 3, as JSON Schema has it)."""

    @field_validator("*", mode="before")
    @classmethod
    def _a_json_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _is_number(field.annotation) and isinstance(value, bool | str):
            wanted = "an integer" if _is_integer(field.annotation) else "a number"
            raise ValueError(f"Input should be {wanted} (a JSON number), not {value!r}")
        return value


class JobSpec(NumbersAreNumbers):
    """A job kind's request spec. Unknown fields are refused (a typo is a 422, not a
    silently ignored option); a field added later needs a default, so rows written
    before it existed still read back."""

    model_config = ConfigDict(extra="forbid")

    kind: ClassVar[JobKind]

    def resolve(self, settings: Settings) -> JobSpec:
        """The spec checked against the deployment's limits, with the defaults that
        depend on its settings filled in (none for this kind)."""
        return self

    def params(self) -> dict[str, object]:
        """The job row's ``params``. Unset options are left out rather than written
        as nulls: rows keep the shape they had before the spec existed."""
        return self.model_dump(mode="json", exclude_none=True)

    @classmethod
    def of_job(cls, job: Job) -> Self:
        """The spec a job row holds."""
        return cls.model_validate(job.params)
