"""What every job kind's spec shares: one pydantic model that is the route's body
(or its public part), the job row's ``params`` and what the handler reads back.

Imports nothing heavy: the API and the scheduler validate with it.
"""

from __future__ import annotations

from typing import ClassVar, Self

from pydantic import BaseModel, ConfigDict

from core.db.models import Job, JobKind
from core.settings import Settings


class JobSpec(BaseModel):
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
