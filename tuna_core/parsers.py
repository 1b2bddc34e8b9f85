"""The JSON body parser of every API view (REST_FRAMEWORK's DEFAULT_PARSER_CLASSES).

Its own module: DRF imports it while defining APIView, so it must not import rest_framework.views.
"""

import json
import math

from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.parsers import JSONParser

MAX_JSON_DEPTH = 64


class StrictJSONParser(JSONParser):
    """JSON bodies whose every value the serializers, the model and the database can take: text without NUL
    (PostgreSQL refuses it) or lone UTF-16 surrogates (no encoding has them), finite numbers (1e309 reads as
    infinity), and at most MAX_JSON_DEPTH levels of nesting (deeper, parsing or rendering recurses out of
    stack). Anything else is a 400 that names where it is, before a view sees the body."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(f"JSON parse error - arrays and objects are nested more than {MAX_JSON_DEPTH} levels deep.") from None
        check_json_value(data)
        return data


def check_json_value(data, *, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Raise ValidationError naming the first value (as ``messages[0].content``) that StrictJSONParser refuses."""
    stack = [(data, "", 0)]
    while stack:  # a loop, not recursion: the depth is what is being checked
        value, path, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth == max_depth:
                raise ParseError(f"JSON parse error - arrays and objects are nested more than {max_depth} levels deep (at {path[:120]}).")
            if isinstance(value, list):
                children = [(item, f"{path}[{index}]", depth + 1) for index, item in enumerate(value)]
            else:
                children = []
                for key, item in value.items():
                    problem = _text_problem(key)
                    if problem:
                        raise ValidationError({_join(path, json.dumps(key)): [f"This key contains {problem}."]})
                    children.append((item, _join(path, key), depth + 1))
            stack.extend(reversed(children))
        elif isinstance(value, str):
            problem = _text_problem(value)
            if problem:
                raise ValidationError({path or "body": [f"This text contains {problem}."]})
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValidationError({path or "body": ["This number is too large: numbers must be finite (at most about 1.8e308)."]})


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "a NUL character (\\u0000), which text cannot hold"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"a lone UTF-16 surrogate ({ascii(exc.object[exc.start])[1:-1]}), which is not valid Unicode; send the whole character"
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
