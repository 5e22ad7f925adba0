"""The plain NER API: which model is served, and entities with character offsets for a list of texts."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from pipeline.core.cpu import describe
from serve.schemas import ModelResponse, NerRequest, NerResponse, TextResult
from serve.state import ServiceState, service

router = APIRouter(tags=["ner"])
State = Annotated[ServiceState, Depends(service)]


@router.get("/v1/model", response_model=ModelResponse)
async def model_info(state: State) -> dict[str, Any]:
    """The model being served: version, entity labels, tag scheme, and the graph file chosen for this CPU."""
    current = state.runtime
    return {"model_version": current.model_version, "labels": current.entity_types,
            "scheme": current.info.get("scheme"), "model_dir": str(state.model_dir),
            "graph": current.onnx_path.name, "cpu": describe()}


@router.post("/v1/ner", response_model=NerResponse,
             responses={413: {"description": "too many texts or a text too long"}})
async def ner(body: NerRequest, state: State) -> NerResponse:
    """Entities with character offsets, labels and scores, one result per text in order."""
    state.check_texts(body.texts)
    out = await state.run(body.texts)
    return NerResponse(model_version=out.model_version,
                       results=[TextResult(**p.to_dict()) for p in out.predictions])
