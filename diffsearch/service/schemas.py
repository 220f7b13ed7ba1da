"""The HTTP API's response bodies (they make the OpenAPI schema at /openapi.json)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

StatusName = Literal["queued", "running", "done", "failed", "cancelled", "interrupted"]
"""``interrupted``: it was running when the service stopped; ``POST .../resume`` continues it."""


class ErrorResponse(BaseModel):
    detail: str = Field(description="One line: the field, what is wrong, what is allowed.")
    field: str | None = Field(None, description="The request field at fault, dotted "
                                                "(e.g. prompts.0, strategy, budget).")
    limit: str | None = Field(None, description="The service limit that was hit "
                                                "(e.g. max_budget_nfe, max_queue).")


class Progress(BaseModel):
    nfe_done: int
    nfe_total: int | None = Field(description="Known once the search started.")


class BestSoFar(BaseModel):
    prompt_index: int
    candidate: int
    score: float = Field(description="The guiding verifier's score of the final image.")
    nfe: int = Field(description="NFEs spent on the search when this candidate arrived.")
    image: str = Field(description="URL of its PNG.")


class Links(BaseModel):
    self: str
    events: str
    cancel: str
    resume: str
    results: str


class SearchSummary(BaseModel):
    id: str
    status: StatusName = Field(description="queued, running, then done, failed or cancelled; "
                                            "interrupted: it was running when the service "
                                            "stopped, and POST .../resume continues it.")
    model: str
    strategy: str
    budget: int | str
    prompts: list[str]
    created_at: float = Field(description="Unix time.")
    started_at: float | None
    finished_at: float | None
    progress: Progress
    best: list[BestSoFar | None] = Field(description="Per prompt, the best candidate with a "
                                                    "final image so far (the final best once "
                                                    "done).")
    error: str | None
    links: Links


class BestResult(BaseModel):
    candidate: int
    seed: int
    score: float | None
    scores: dict[str, float]
    lineage: list[int] = Field(description="The best candidate and its ancestors, newest first.")
    image: str


class PromptResult(BaseModel):
    index: int
    prompt: str
    nfe: int
    candidates: int
    best: BestResult | None


class ResultSummary(BaseModel):
    nfe: int
    verifier_calls: int
    wall_seconds: float
    failed_candidates: int
    prompts: list[PromptResult]


class SearchDetail(SearchSummary):
    job: dict[str, Any] = Field(description="The validated job, as a request would give it.")
    queue_position: int | None = Field(description="0: next to start; null unless queued.")
    history: list[list[tuple[int, float]]] = Field(
        description="Per prompt, (NFEs, best score) each time the best improved.")
    result: ResultSummary | None


class SearchList(BaseModel):
    searches: list[SearchSummary]


class ServiceInfo(BaseModel):
    version: str
    auth: bool = Field(description="Whether /v1 requests need a bearer token.")
    models: list[str]
    strategies: list[str]
    verifiers: list[str]
    limits: dict[str, int]
    executor: str


class Health(BaseModel):
    status: Literal["ok"]
