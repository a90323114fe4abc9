"""The playground: one static page served by the server itself."""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
router = APIRouter()


@router.get("/", include_in_schema=False)
async def playground():
    return FileResponse(STATIC_DIR / "index.html")
