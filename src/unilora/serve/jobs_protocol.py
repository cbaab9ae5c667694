"""The fine-tuning API's request bodies, checked before any work, and its response shapes (OpenAI's
file, fine_tuning.job, event and checkpoint objects)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .protocol import RequestError

SUFFIX_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_LIST = 100  # the largest `limit` of a list


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Literal["auto"] | int = Field(default="auto")
    batch_size: Literal["auto"] | int = Field(default="auto")
    learning_rate_multiplier: Literal["auto"] | float = Field(default="auto")

    @field_validator("n_epochs", "batch_size")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and not 1 <= value <= 1000:
            raise ValueError("must be 'auto' or an integer from 1 to 1000")
        return value

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _multiplier(cls, value):
        if value != "auto" and not 0 < value <= 100:
            raise ValueError("must be 'auto' or a number above 0 and at most 100")
        return value


class Method(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str = "supervised"
    supervised: dict | None = None


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(default=None, min_length=1, max_length=64)
    suffix: str | None = Field(default=None, pattern=SUFFIX_PATTERN)
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    adapter: dict | None = None  # ours, through the client's extra_body: AdapterConfig's fields

    def settings(self) -> dict:
        """The hyperparameters: the top-level ones (OpenAI's older form) or the method's."""
        given = self.hyperparameters
        if self.method is not None:
            if self.method.type != "supervised":
                raise RequestError(400, f"'method.type': only 'supervised' fine-tuning is supported, not "
                                        f"'{self.method.type}'")
            inner = (self.method.supervised or {}).get("hyperparameters")
            if inner is not None:
                try:
                    given = Hyperparameters.model_validate(inner)
                except ValueError as err:
                    raise RequestError(400, f"'method.supervised.hyperparameters': {str(err).splitlines()[-1]}") from None
        return (given or Hyperparameters()).model_dump()


def list_page(rows: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": rows, "has_more": has_more}


def file_object(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "status_details": None}


def job_object(row: dict) -> dict:
    return {"id": row["id"], "object": "fine_tuning.job", "created_at": row["created_at"],
            "finished_at": row["finished_at"], "model": row["model"], "fine_tuned_model":
            row["fine_tuned_model"] if row["status"] == "succeeded" else None,
            "organization_id": row["tenant"], "result_files": [], "status": row["status"],
            "validation_file": row["validation_file"], "training_file": row["training_file"],
            "hyperparameters": row["hyperparameters"], "trained_tokens": row["trained_tokens"],
            "error": row["error"], "seed": row["seed"], "suffix": row["suffix"], "estimated_finish": None,
            "integrations": [], "method": {"type": "supervised", "supervised": {"hyperparameters": row["hyperparameters"]}},
            "adapter": row["adapter"]}


def event_object(row: dict) -> dict:
    return {"id": f"ftevent-{row['seq']}", "object": "fine_tuning.job.event", "created_at": row["created_at"],
            "level": row["level"], "message": row["message"], "data": row["data"] or {}, "type": row["type"]}


def checkpoint_object(row: dict) -> dict:
    return {"id": row["id"], "object": "fine_tuning.job.checkpoint", "created_at": row["created_at"],
            "fine_tuned_model_checkpoint": row["model_name"], "fine_tuning_job_id": row["job_id"],
            "metrics": row["metrics"], "step_number": row["step"]}
