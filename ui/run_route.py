"""The route the Run tab's pages poll: the published parts of the run's state (ui/run_publisher.py), as they are.

A poll through gradio's queue costs the web server ~12 ms of CPU (the request's session, walking every value it
sends for files, rebuilding skipped outputs): twenty pages polling once a second took 14 % of the demo's speed. This
plain FastAPI route sends bytes made once for every page, or 304 when the page has them (its If-None-Match), behind
the same login as the page: gradio's own login check guards it.

    GET /studio/run/state | plot | clip | log
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request, Response

from ui.run_publisher import PARTS, RunPublisher

ROUTE = "/studio/run"
# In a page's js: `await part(name, etag)` is {etag, value} of the part, or null when it is unchanged (304) or
# could not be fetched (the app restarting, the login gone); relative, so it works under a share link's path too.
PART_JS = """const part = async (name, etag) => {
    try {
      const headers = etag ? {'If-None-Match': etag} : {};
      const answer = await fetch('""" + ROUTE.lstrip("/") + """/' + name, {cache: 'no-store', headers});
      return answer.status === 200 ? {etag: answer.headers.get('ETag'), value: await answer.json()} : null;
    } catch (error) { return null; }
  };"""
GUARDED = "/config"  # gradio's route of the page's layout, which answers 401 without the page's login


def login_check(server_app: Any) -> list[Any]:  # noqa: ANN401 - gradio's App
    """Gradio's own login check: the FastAPI dependencies of the route that serves the page's layout."""
    for route in server_app.routes:
        if getattr(route, "path", None) == GUARDED and getattr(route, "dependencies", None):
            return list(route.dependencies)
    raise RuntimeError(f"gradio's {GUARDED} route has no login check: the run's state would be served without one")


def add_run_route(server_app: Any, publisher: RunPublisher) -> None:  # noqa: ANN401 - gradio's App (FastAPI)
    """Serve `publisher`'s parts at ROUTE/<part> on the launched app, behind its login."""
    async def run_part(part: str, request: Request) -> Response:
        if part not in PARTS:
            raise HTTPException(status_code=404, detail=f"no part {part!r}: one of {', '.join(PARTS)}")
        found = publisher.latest().parts[part]
        headers = {"ETag": found.etag, "Cache-Control": "no-store"}
        if request.headers.get("if-none-match") == found.etag:
            return Response(status_code=304, headers=headers)
        return Response(found.body, media_type="application/json", headers=headers)

    server_app.add_api_route(ROUTE + "/{part}", run_part, methods=["GET"],
                             dependencies=login_check(server_app), include_in_schema=False)
