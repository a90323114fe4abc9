"""GET /v1/models."""

from fastapi import APIRouter

from .deps import ChatDep, StateDep

router = APIRouter()


@router.get("/v1/models")
async def models(chat: ChatDep, state: StateDep):
    return {"object": "list", "data": [{"id": chat.model_name, "object": "model", "created": 0,
                                        "owned_by": "slime-serve", "max_model_len": state.settings.max_model_len}]}
