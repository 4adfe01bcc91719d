"""/api/prompts/: prompts, their versions, commits and deployments (spec 2.6), behind an admin key.

One admin-store document per prompt (kind "prompt", id = prompt_id) holds its versions. Every
change to an existing prompt is a read-modify-write through `Snapshot.update`, so two replicas
adding a version at once get numbers n+1 and n+2, never the same one. A version is created as a
draft (editable); a commit makes it read-only; a deployment makes it the live version that
requests without `prompt.version` get (deploying a draft commits it first).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from plugins.prompts.validate import VERSION_FIELDS, Invalid, Resolve, check_prompt, check_version
from proxy.admin import AdminGuard, error_response, json_response, read_object
from proxy.model_table import ModelTable
from proxy.store import Conflict, StoredObject
from proxy.store.snapshot import Snapshot

KIND = "prompt"
MAX_VERSIONS = 1000
PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
MAX_VERSIONS_PAGE_SIZE = 500
FILTERS = ("prompt_id", "name", "description", "starred", "tags")
OPERATORS = ("", "in", "iexact", "contains", "icontains")


class Refused(Exception):
    """A change that cannot be made: the status and detail to answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def _numbers(data: dict[str, Any]) -> list[int]:
    return sorted(int(n) for n in data.get("versions") or {})


def version_view(version: dict[str, Any], deployed: int | None) -> dict[str, Any]:
    shown = {"version": version["version"], "is_draft": version["is_draft"],
             "is_deployed": version["version"] == deployed}
    shown.update({name: version.get(name) for name in VERSION_FIELDS})
    shown.update(created_at=version.get("created_at"), committed_at=version.get("committed_at"))
    return shown


def prompt_view(obj: StoredObject) -> dict[str, Any]:
    data = obj.data
    numbers = _numbers(data)
    deployed = data.get("deployed_version")
    live = data["versions"].get(str(deployed)) if deployed is not None else None
    return {"prompt_id": data["prompt_id"], "name": data["name"], "description": data.get("description", ""),
            "tags": data.get("tags", []), "starred": data.get("starred", False), "deployed_version": deployed,
            "live_version": version_view(live, deployed) if live is not None else None,
            "latest_version": numbers[-1] if numbers else None, "version_count": len(numbers),
            "created_at": _iso(obj.created_at), "updated_at": _iso(obj.updated_at)}


def _page_numbers(args: dict[str, Any], max_size: int) -> tuple[int, int]:
    out = []
    for name, default, high in (("page", 1, 10_000_000), ("page_size", PAGE_SIZE, max_size)):
        value = args.get(name, default)
        try:
            number = int(value)
            if isinstance(value, bool | float) or not 1 <= number <= high:
                raise ValueError
        except (TypeError, ValueError):
            raise Invalid(f"{name}: expected a whole number from 1 to {high}") from None
        out.append(number)
    return out[0], out[1]


def _page(request: Request, rows: list[Any], page: int, size: int, view: Callable[[Any], Any]) -> dict[str, Any]:
    """One page of `rows`, each shown through `view`, with the links of the log lists."""
    def link(number: int) -> str:
        params = dict(request.query_params)
        params["page"] = str(number)
        return str(request.url.replace(query=urlencode(params)))

    pages = (len(rows) + size - 1) // size
    return {"results": [view(row) for row in rows[(page - 1) * size: page * size]], "count": len(rows),
            "next": link(page + 1) if page < pages else None, "previous": link(page - 1) if page > 1 else None}


def _matcher(field: str, spec: Any, where: str) -> Callable[[dict[str, Any]], bool]:
    """One filter: a plain value (or list of values), or the spec's {"operator", "value": [...]}."""
    operator = None
    if isinstance(spec, dict):
        if set(spec) - {"operator", "value"}:
            raise Invalid(f"{where}: expected {{\"operator\": ..., \"value\": [...]}}")
        operator = spec.get("operator", "")
        if operator not in OPERATORS:
            raise Invalid(f"{where}.operator: expected one of {', '.join(repr(o) for o in OPERATORS)}")
        spec = spec.get("value")
    values = spec if isinstance(spec, list) else [spec]
    if field == "starred":
        wanted = set()
        for v in values:
            if v not in (True, False, "true", "false"):
                raise Invalid(f"{where}: expected true or false")
            wanted.add(v in (True, "true"))
        return lambda data: bool(data.get("starred")) in wanted
    if not all(isinstance(v, str) for v in values):
        raise Invalid(f"{where}: expected a string or an array of strings")
    if operator is None:  # the plain form: names and descriptions match a part, ids and tags exactly
        operator = "icontains" if field in ("name", "description") else ""
    fold = operator.startswith("i")
    wanted = [v.lower() for v in values] if fold else list(values)

    def one(text: str) -> bool:
        text = text.lower() if fold else text
        if operator.endswith("contains"):
            return any(v in text for v in wanted)
        return text in wanted

    if field == "tags":
        return lambda data: any(one(tag) for tag in data.get("tags") or [])
    return lambda data: one(str(data.get(field) or ""))


def parse_filters(args: dict[str, Any]) -> list[Callable[[dict[str, Any]], bool]]:
    matchers = []
    for field in FILTERS:
        if args.get(field) not in (None, ""):
            value = args[field]
            if field == "tags" and isinstance(value, str):  # from the query string: tags=a,b
                value = [t for t in value.split(",") if t]
            matchers.append(_matcher(field, value, field))
    filters = args.get("filters")
    if filters is not None:
        if not isinstance(filters, dict):
            raise Invalid("filters: expected an object of {field: {operator, value}}")
        for field, spec in filters.items():
            if field not in FILTERS:
                raise Invalid(f"filters.{field}: cannot filter on it; filters: {', '.join(FILTERS)}")
            matchers.append(_matcher(field, spec, f"filters.{field}"))
    return matchers


class PromptsAPI:
    def __init__(self, snapshot: Snapshot, guard: AdminGuard, models: ModelTable) -> None:
        self.snapshot = snapshot
        self.guard = guard
        self.resolve: Resolve = models.resolve

    def routes(self) -> list[Route]:
        guard = self.guard
        base = "/api/prompts/"
        item = base + "{prompt_id}/"
        return [
            Route(base, guard(self.collection), methods=["GET", "POST"]),
            Route(base + "list/", guard(self.listed), methods=["POST"]),
            Route(base + "summary/", guard(self.summary), methods=["POST"]),
            Route(item, guard(self.item), methods=["GET", "PATCH", "DELETE"]),
            Route(item + "versions/", guard(self.versions), methods=["GET", "POST"]),
            Route(item + "versions/{version}/", guard(self.version), methods=["GET", "PATCH", "DELETE"]),
            Route(item + "commits/", guard(self.commit), methods=["POST"]),
            Route(item + "deployments/", guard(self.deploy), methods=["POST"]),
        ]

    # -- helpers ---------------------------------------------------------------------------

    async def _find(self, prompt_id: str) -> StoredObject | None:
        obj = self.snapshot.of(KIND).get(prompt_id)
        if obj is None:
            await self.snapshot.refresh()  # made by another worker a moment ago?
            obj = self.snapshot.of(KIND).get(prompt_id)
        return obj

    async def _change(self, prompt_id: str, change: Callable[[dict[str, Any]], dict[str, Any]]) -> StoredObject:
        """Read-modify-write of one prompt; Refused when it is missing or the change is refused."""
        try:
            obj = await self.snapshot.update(KIND, prompt_id, change)
        except Conflict as exc:
            raise Refused(409, str(exc)) from None
        if obj is None:
            raise Refused(404, f"Prompt {prompt_id} not found")
        return obj

    async def _body(self, request: Request) -> dict[str, Any]:
        body, refused = await read_object(request)
        if refused is not None:
            raise Refused(refused.status_code, orjson.loads(refused.body)["detail"])
        return body

    @staticmethod
    def _version_number(value: Any) -> int:
        try:
            if isinstance(value, bool | float):
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise Invalid("version: expected a version number") from None

    @staticmethod
    def _get_version(data: dict[str, Any], number: int) -> dict[str, Any]:
        version = data["versions"].get(str(number))
        if version is None:
            raise Refused(404, f"Prompt {data['prompt_id']} has no version {number}")
        return version

    async def _guarded(self, work: Callable[[], Any]) -> Response:
        try:
            return await work()
        except Refused as exc:
            return error_response(exc.detail, exc.status)
        except Invalid as exc:
            return error_response(str(exc), 400)

    # -- prompts ---------------------------------------------------------------------------

    async def collection(self, request: Request) -> Response:
        if request.method == "GET":
            return await self._guarded(lambda: self._list(request, dict(request.query_params)))
        return await self._guarded(lambda: self._create(request))

    async def listed(self, request: Request) -> Response:
        async def work() -> Response:
            body = await self._body(request)
            unknown = set(body) - {*FILTERS, "filters", "page", "page_size", "operator"}
            if unknown:
                raise Invalid(f"{sorted(unknown)[0]}: unknown field; filters: {', '.join(FILTERS)}")
            if body.get("operator", "AND") != "AND":
                raise Invalid("operator: only AND is supported: a prompt matches every filter")
            return await self._list(request, {**dict(request.query_params), **body})

        return await self._guarded(work)

    async def _list(self, request: Request, args: dict[str, Any]) -> Response:
        matchers = parse_filters(args)
        page, size = _page_numbers(args, MAX_PAGE_SIZE)
        objects = sorted(self.snapshot.of(KIND).values(), key=lambda o: (o.created_at, o.id), reverse=True)
        rows = [o for o in objects if all(m(o.data) for m in matchers)]
        return json_response(_page(request, rows, page, size, prompt_view))

    async def _create(self, request: Request) -> Response:
        fields = check_prompt(await self._body(request), creating=True)
        prompt_id = fields.pop("prompt_id", None) or uuid.uuid4().hex
        if prompt_id in self.snapshot.of(KIND):
            raise Refused(409, f"A prompt with prompt_id {prompt_id!r} already exists")
        data = {"prompt_id": prompt_id, "name": fields["name"], "description": fields.get("description", ""),
                "tags": fields.get("tags", []), "starred": fields.get("starred", False), "deployed_version": None,
                "versions": {}, "last_version": 0}
        try:
            obj = await self.snapshot.put(KIND, prompt_id, data, create=True)
        except Conflict:
            raise Refused(409, f"A prompt with prompt_id {prompt_id!r} already exists") from None
        return json_response(prompt_view(obj), 201)

    async def summary(self, request: Request) -> Response:
        prompts = [o.data for o in self.snapshot.of(KIND).values()]
        drafts = sum(1 for p in prompts if any(v.get("is_draft") for v in (p.get("versions") or {}).values()))
        return json_response({"total": len(prompts), "deployed": sum(1 for p in prompts if p.get("deployed_version")),
                              "with_draft": drafts})

    async def item(self, request: Request) -> Response:
        prompt_id = request.path_params["prompt_id"]

        async def work() -> Response:
            if request.method == "GET":
                obj = await self._find(prompt_id)
                if obj is None:
                    raise Refused(404, f"Prompt {prompt_id} not found")
                return json_response(prompt_view(obj))
            if request.method == "DELETE":
                if not await self.snapshot.delete(KIND, prompt_id):
                    raise Refused(404, f"Prompt {prompt_id} not found")
                return Response(status_code=204)
            fields = check_prompt(await self._body(request), creating=False)
            return json_response(prompt_view(await self._change(prompt_id, lambda data: {**data, **fields})))

        return await self._guarded(work)

    # -- versions --------------------------------------------------------------------------

    async def versions(self, request: Request) -> Response:
        prompt_id = request.path_params["prompt_id"]

        async def listing() -> Response:
            obj = await self._find(prompt_id)
            if obj is None:
                raise Refused(404, f"Prompt {prompt_id} not found")
            page, size = _page_numbers(dict(request.query_params), MAX_VERSIONS_PAGE_SIZE)
            deployed = obj.data.get("deployed_version")
            rows = [obj.data["versions"][str(n)] for n in reversed(_numbers(obj.data))]
            return json_response(_page(request, rows, page, size, lambda v: version_view(v, deployed)))

        async def create() -> Response:
            body = await self._body(request)
            deploy = body.pop("deploy", False)
            if not isinstance(deploy, bool):
                raise Invalid("deploy: expected true or false")
            fields = check_version(body, self.resolve)
            made: dict[str, int] = {}

            def add(data: dict[str, Any]) -> dict[str, Any]:
                versions = data["versions"]
                if len(versions) >= MAX_VERSIONS:
                    raise Refused(400, f"prompt {prompt_id} has {MAX_VERSIONS} versions, the most a prompt may "
                                       "have; delete old ones first")
                number = max([data.get("last_version", 0), *map(int, versions)]) + 1
                now = _now()
                version = {"version": number, "is_draft": not deploy, **dict.fromkeys(VERSION_FIELDS), **fields,
                           "created_at": now, "committed_at": now if deploy else None}
                versions[str(number)] = version
                data["last_version"] = number
                if deploy:
                    data["deployed_version"] = number
                made["number"] = number
                return data

            obj = await self._change(prompt_id, add)
            deployed = obj.data.get("deployed_version")
            return json_response(version_view(obj.data["versions"][str(made["number"])], deployed), 201)

        return await self._guarded(listing if request.method == "GET" else create)

    async def version(self, request: Request) -> Response:
        prompt_id = request.path_params["prompt_id"]

        async def work() -> Response:
            obj = await self._find(prompt_id)
            if obj is None:
                raise Refused(404, f"Prompt {prompt_id} not found")
            try:
                number = self._version_number(request.path_params["version"])
            except Invalid:
                raise Refused(404, f"Prompt {prompt_id} has no version {request.path_params['version']}") from None
            if request.method == "GET":
                version = self._get_version(obj.data, number)
                return json_response(version_view(version, obj.data.get("deployed_version")))
            if request.method == "DELETE":
                def remove(data: dict[str, Any]) -> dict[str, Any]:
                    self._get_version(data, number)
                    if data.get("deployed_version") == number:
                        raise Refused(400, f"version {number} is deployed; deploy another version before deleting it")
                    del data["versions"][str(number)]
                    return data

                await self._change(prompt_id, remove)
                return Response(status_code=204)
            body = await self._body(request)

            def edit(data: dict[str, Any]) -> dict[str, Any]:
                version = self._get_version(data, number)
                if not version["is_draft"]:
                    raise Refused(400, f"version {number} is committed and read-only; create a new version")
                fields = check_version(body, self.resolve, current=version)
                data["versions"][str(number)] = {**version, **fields}
                return data

            obj = await self._change(prompt_id, edit)
            return json_response(version_view(obj.data["versions"][str(number)], obj.data.get("deployed_version")))

        return await self._guarded(work)

    # -- commits and deployments -----------------------------------------------------------

    def _commit_fields(self, body: dict[str, Any]) -> tuple[int | None, str | None]:
        """A commit's or deployment's `version` (None: not given) and `commit_message`."""
        unknown = set(body) - {"version", "commit_message"}
        if unknown:
            raise Invalid(f"{sorted(unknown)[0]}: unknown field; expected some of commit_message, version")
        message = body.get("commit_message")
        if message is not None and not isinstance(message, str):
            raise Invalid("commit_message: expected a string")
        return (None if body.get("version") is None else self._version_number(body["version"])), message

    async def commit(self, request: Request) -> Response:
        prompt_id = request.path_params["prompt_id"]

        async def work() -> Response:
            requested, message = self._commit_fields(await self._body(request))
            done: dict[str, int] = {}

            def commit(data: dict[str, Any]) -> dict[str, Any]:
                number = requested
                if number is None:
                    drafts = [n for n in _numbers(data) if data["versions"][str(n)]["is_draft"]]
                    if not drafts:
                        raise Refused(400, f"prompt {prompt_id} has no draft to commit; create a new version")
                    number = drafts[-1]
                version = self._get_version(data, number)
                if not version["is_draft"]:
                    raise Refused(400, f"version {number} is already committed")
                _commit(version, message)
                done["number"] = number
                return data

            obj = await self._change(prompt_id, commit)
            return json_response(version_view(obj.data["versions"][str(done["number"])],
                                              obj.data.get("deployed_version")))

        return await self._guarded(work)

    async def deploy(self, request: Request) -> Response:
        prompt_id = request.path_params["prompt_id"]

        async def work() -> Response:
            number, message = self._commit_fields(await self._body(request))
            if number is None:
                raise Invalid("version: required, the version number to deploy")

            def deploy(data: dict[str, Any]) -> dict[str, Any]:
                version = self._get_version(data, number)
                if version["is_draft"]:
                    _commit(version, message)
                data["deployed_version"] = number
                return data

            return json_response(prompt_view(await self._change(prompt_id, deploy)))

        return await self._guarded(work)


def _commit(version: dict[str, Any], message: str | None) -> None:
    version["is_draft"] = False
    version["committed_at"] = _now()
    if message is not None:
        version["commit_message"] = message

