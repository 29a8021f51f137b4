"""`/docs`: the API reference as one self-contained HTML page, rendered from the OpenAPI schema.

Swagger UI loads its scripts from a CDN, which the app's Content-Security-Policy blocks and an
offline hospital network cannot reach anyway. This page needs no script and no other site: the
endpoints, their parameters, bodies and answers, and the schemas, as plain HTML with a small
stylesheet served by the app itself (`DOCS_CSS_PATH`).
"""

from __future__ import annotations

from html import escape
from typing import Any

DOCS_CSS_PATH = "/docs.css"
DOCS_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 60rem; padding: 1rem 1.5rem; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ccc; }
section.op { border: 1px solid #ddd; border-radius: 6px; margin: 1rem 0; padding: 0.4rem 1rem; }
.method { display: inline-block; min-width: 4.5rem; font-weight: bold; text-transform: uppercase; }
code, .path { font-family: ui-monospace, monospace; }
table { border-collapse: collapse; margin: 0.4rem 0 0.8rem; } td, th { border: 1px solid #ddd; padding: 0.2rem 0.5rem;
  text-align: left; vertical-align: top; }
"""


def reference_html(schema: dict[str, Any]) -> str:
    info = schema.get("info", {})
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(info.get('title', 'API'))} API reference</title>",
        f'<link rel="stylesheet" href="{DOCS_CSS_PATH}"></head><body>',
        f"<h1>{escape(info.get('title', 'API'))} API <small>{escape(str(info.get('version', '')))}</small></h1>",
        f"<p>{escape(info.get('description', ''))}</p>",
        '<p>The machine-readable schema: <a href="/openapi.json">/openapi.json</a>.</p>',
        "<h2>Endpoints</h2>",
    ]
    for path, methods in schema.get("paths", {}).items():
        parts += [_operation(path, method, op) for method, op in methods.items()]
    parts.append("<h2>Schemas</h2>")
    for name, model in schema.get("components", {}).get("schemas", {}).items():
        parts.append(_model(name, model))
    parts.append("</body></html>")
    return "\n".join(parts)


def _operation(path: str, method: str, op: dict[str, Any]) -> str:
    rows = [f'<section class="op" id="{escape(method + path, quote=True)}">',
            f'<h3><span class="method">{escape(method)}</span> <span class="path">{escape(path)}</span></h3>',
            f"<p>{escape(op.get('summary', ''))}</p>"]
    if op.get("description"):
        rows.append(f"<p>{escape(op['description'])}</p>")
    params = op.get("parameters", [])
    if params:
        rows.append(_table(["parameter", "in", "type", "required", "description"], [
            [f"<code>{escape(p['name'])}</code>", escape(p.get("in", "")), _type(p.get("schema", {})),
             "yes" if p.get("required") else "no", escape(_description(p))] for p in params]))
    body = op.get("requestBody", {}).get("content", {})
    for content_type, content in body.items():
        rows.append(f"<p>Body ({escape(content_type)}): {_type(content.get('schema', {}))}</p>")
    responses = op.get("responses", {})
    rows.append(_table(["status", "meaning", "body"], [
        [escape(code), escape(r.get("description", "")),
         ", ".join(_type(c.get("schema", {})) for c in r.get("content", {}).values())]
        for code, r in responses.items()]))
    rows.append("</section>")
    return "\n".join(rows)


def _model(name: str, model: dict[str, Any]) -> str:
    required = set(model.get("required", []))
    rows = [[f"<code>{escape(field)}</code>", _type(spec), "yes" if field in required else "no",
             escape(_description(spec))] for field, spec in model.get("properties", {}).items()]
    head = f'<h3 id="{escape(name, quote=True)}">{escape(name)}</h3>'
    return head + (_table(["field", "type", "required", "description"], rows) if rows else "")


def _description(spec: dict[str, Any]) -> str:
    text = spec.get("description", "") or spec.get("schema", {}).get("description", "")
    examples = spec.get("examples")
    return f"{text} (example: {examples[0]})" if isinstance(examples, list) and examples else text


def _type(spec: dict[str, Any]) -> str:
    """A schema as short HTML: a link to a named model, `list of ...`, `a | b`, or the JSON type."""
    if "$ref" in spec:
        name = spec["$ref"].rsplit("/", 1)[-1]
        return f'<a href="#{escape(name, quote=True)}">{escape(name)}</a>'
    for key in ("anyOf", "oneOf"):
        if key in spec:
            return " | ".join(_type(s) for s in spec[key])
    if spec.get("type") == "array":
        return f"list of {_type(spec.get('items', {}))}"
    return escape(str(spec.get("type", spec.get("format", "any"))))


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
