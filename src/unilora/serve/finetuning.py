"""The fine-tuning API's handlers: /v1/files and /v1/fine_tuning/jobs, as OpenAI's, per tenant.

A tenant sees only its own files, jobs and `ft:` models: another tenant's id is answered 404, as a
missing one is. An uploaded file is read whole under `--max-file-mb`, checked with the readers
`unilora finetune` uses (one line naming the file and line of the first problem), and kept in the
server's state folder; the job store (job_store.py) remembers it.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from pathlib import Path

from fastapi import Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ..core.errors import UniLoraError
from .http import read_body
from .jobs_protocol import (
    MAX_LIST,
    JobCreate,
    checkpoint_object,
    event_object,
    file_object,
    job_object,
    list_page,
)
from .protocol import RequestError, parse
from .runtime import Server
from .tenants import tenant_of
from .training_job import JobRequest, read_uploaded, stored_file

SUFFIXES = (".jsonl", ".json", ".csv", ".txt")
FORM_OVERHEAD = 64 << 10  # bytes of a multipart body beyond its file: boundaries and the other fields


def _page_limit(request: Request) -> int:
    raw = request.query_params.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIST:
        raise RequestError(400, f"'limit' must be an integer from 1 to {MAX_LIST}")
    return int(raw)


def _jobs_of(server: Server):
    if server.cotrainer is None:
        raise RequestError(404, server.jobs_off or "fine-tuning is not available on this server")
    return server.jobs


# --- files -------------------------------------------------------------------------------------------
async def upload_file(request: Request, server: Server) -> dict:
    db = _jobs_of(server)
    tenant = tenant_of(request)
    limit = server.settings.max_file_mb << 20
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestError(400, "upload the file as multipart/form-data with fields 'file' and 'purpose'")
    body = await read_body(request, limit + FORM_OVERHEAD)

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
    except Exception as err:  # the multipart parser's own errors
        raise RequestError(400, f"the upload is not a readable multipart form ({type(err).__name__})") from None
    upload, purpose = form.get("file"), form.get("purpose")
    if purpose != "fine-tune":
        raise RequestError(400, f"'purpose' must be 'fine-tune', got {str(purpose)[:40]!r}")
    if not isinstance(upload, UploadFile):
        raise RequestError(400, "the form has no 'file' part")
    filename = os.path.basename(upload.filename or "data.jsonl")
    suffix = Path(filename).suffix.lower()
    if suffix not in SUFFIXES:
        raise RequestError(400, f"'{filename[:80]}': training files are JSONL (chat 'messages', 'prompt'/'completion' "
                                f"or 'text' rows), JSON, CSV or .txt; name the file with one of {', '.join(SUFFIXES)}")
    data = await upload.read()
    if len(data) > limit:
        raise RequestError(413, f"the file is larger than the server's --max-file-mb {server.settings.max_file_mb}")
    if db.file_bytes(tenant) + len(data) > server.settings.tenant_max_file_mb << 20:
        raise RequestError(429, f"this tenant's files would pass {server.settings.tenant_max_file_mb} MB; delete some "
                                "with DELETE /v1/files/{id}")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", filename)[-100:].lstrip(".") or f"data{suffix}"
    row = await run_in_threadpool(_keep_file, server.cotrain_state / "files", safe, filename, data)
    row.update(tenant=tenant, purpose="fine-tune")
    db.add_file(row)
    return file_object(row)


def _keep_file(files_dir: Path, safe: str, filename: str, data: bytes) -> dict:
    """Write the upload under a new id and check it as `unilora finetune` would read it."""
    file_id = f"file-{secrets.token_hex(12)}"
    folder = files_dir / file_id
    folder.mkdir(parents=True)
    path = folder / safe
    staging = folder / f".{safe}.tmp"
    staging.write_bytes(data)
    os.replace(staging, path)
    try:
        kind, rows = read_uploaded(path)
    except UniLoraError as err:
        shutil.rmtree(folder, ignore_errors=True)
        raise RequestError(400, str(err).replace(safe, filename)) from None
    return {"id": file_id, "filename": filename, "bytes": len(data), "created_at": int(time.time()), "kind": kind,
            "rows": len(rows)}


def _found(row: dict | None, what: str, given: str) -> dict:
    """The tenant's row, or 404: another tenant's is answered as a missing one."""
    if row is None:
        raise RequestError(404, f"no {what} '{given[:80]}'")
    return row


def _file_row(server: Server, request: Request, file_id: str) -> dict:
    return _found(_jobs_of(server).file(file_id, tenant_of(request)), "file", file_id)


async def list_files(request: Request, server: Server) -> dict:
    return list_page([file_object(r) for r in _jobs_of(server).files(tenant_of(request))], False)


async def retrieve_file(request: Request, server: Server, file_id: str) -> dict:
    return file_object(_file_row(server, request, file_id))


async def file_content(request: Request, server: Server, file_id: str):
    row = _file_row(server, request, file_id)
    return FileResponse(stored_file(server.cotrain_state / "files", row["id"]), media_type="application/octet-stream")


async def delete_file(request: Request, server: Server, file_id: str) -> dict:
    db = _jobs_of(server)
    row = _file_row(server, request, file_id)
    if db.jobs_using_file(row["id"]):
        raise RequestError(409, f"file '{file_id}' is used by a job that has not ended; cancel the job first")
    db.delete_file(row["id"])
    shutil.rmtree(server.cotrain_state / "files" / row["id"], ignore_errors=True)
    return {"id": row["id"], "object": "file", "deleted": True}


# --- jobs --------------------------------------------------------------------------------------------
async def create_job(request: Request, server: Server) -> dict:
    db = _jobs_of(server)
    tenant = tenant_of(request)
    req = parse(JobCreate, await read_body(request, server.settings.max_body_bytes))
    base = server.settings.model_id
    if req.model not in (base, server.settings.model):
        raise RequestError(400, f"'model': jobs train adapters of this server's base model '{base}', not "
                                f"'{req.model[:80]}'")
    hyperparameters = req.settings()
    training = _file_row(server, request, req.training_file)
    validation = _file_row(server, request, req.validation_file) if req.validation_file else None
    if validation is not None and validation["kind"] != training["kind"]:
        raise RequestError(400, f"the validation file holds {validation['kind']} data and the training file "
                                f"{training['kind']} data")
    adapter = dict(req.adapter or {})
    seed = req.seed if req.seed is not None else 0
    try:
        JobRequest("check", seed, None, None, None, adapter, Path(), None).config(server.settings.model)
    except UniLoraError as err:
        raise RequestError(400, f"'adapter': {err}") from None
    if db.running_jobs(tenant) >= server.settings.tenant_max_jobs:
        raise RequestError(429, f"this tenant has {server.settings.tenant_max_jobs} jobs that have not ended (the "
                                "server's --tenant-max-jobs); wait for one or cancel one")
    job_id = f"ftjob-{secrets.token_hex(12)}"
    short_base = Path(base).name.replace(":", "-")
    row = {"id": job_id, "tenant": tenant, "created_at": int(time.time()), "finished_at": None, "model": req.model,
           "training_file": training["id"], "validation_file": validation["id"] if validation else None,
           "suffix": req.suffix, "seed": seed, "hyperparameters": hyperparameters, "adapter": adapter,
           "status": "validating_files", "fine_tuned_model": f"ft:{short_base}:{req.suffix or ''}:{job_id}",
           "store_name": None, "error": None, "trained_tokens": None}
    db.add_job(row)
    db.add_event(job_id, f"Validating training file: {training['id']}"
                 + (f" and validation file: {validation['id']}" if validation else ""))
    created = job_object(db.job(job_id))  # as created: validation may end before the answer is sent
    server.cotrainer.validate(job_id)
    return created


def _job_row(server: Server, request: Request, job_id: str) -> dict:
    return _found(_jobs_of(server).job(job_id, tenant_of(request)), "fine-tuning job", job_id)


async def list_jobs(request: Request, server: Server) -> dict:
    limit = _page_limit(request)
    rows = _jobs_of(server).jobs(tenant_of(request), request.query_params.get("after"), limit + 1)
    return list_page([job_object(r) for r in rows[:limit]], len(rows) > limit)


async def retrieve_job(request: Request, server: Server, job_id: str) -> dict:
    return job_object(_job_row(server, request, job_id))


async def cancel_job(request: Request, server: Server, job_id: str) -> dict:
    row = _job_row(server, request, job_id)
    if not server.cotrainer.cancel(row["id"]):
        raise RequestError(400, f"job '{job_id}' has already {row['status'].replace('_', ' ')}; only a job that has "
                                "not ended can be cancelled")
    return job_object(_jobs_of(server).job(row["id"]))


async def job_events(request: Request, server: Server, job_id: str) -> dict:
    row = _job_row(server, request, job_id)
    limit = _page_limit(request)
    after = request.query_params.get("after")
    seq = None
    if after is not None:
        if not re.fullmatch(r"ftevent-\d{1,18}", after):
            raise RequestError(400, "'after' must be an event id (ftevent-N)")
        seq = int(after.split("-")[1])
    rows = _jobs_of(server).events(row["id"], seq, limit + 1)
    return list_page([event_object(r) for r in rows[:limit]], len(rows) > limit)


async def job_checkpoints(request: Request, server: Server, job_id: str) -> dict:
    row = _job_row(server, request, job_id)
    limit = _page_limit(request)
    rows = _jobs_of(server).checkpoints(row["id"])
    return list_page([checkpoint_object(r) for r in rows[:limit]], len(rows) > limit)
