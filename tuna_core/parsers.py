"""The JSON body parser of every API view (REST_FRAMEWORK's DEFAULT_PARSER_CLASSES).

Its own module: DRF imports it while defining APIView, so it must not import rest_framework.views.
"""

import codecs
import json
import math
import re
from itertools import chain

from django.conf import settings
from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.parsers import JSONParser
from rest_framework.utils.json import strict_constant

MAX_JSON_DEPTH = 64
# A string holds a NUL or a lone UTF-16 surrogate only through an escape (raw control characters and undecodable
# bytes are refused by the parser itself). Text with no such escape, no number that reads as infinity (seen by the
# parse) and no nesting deeper than MAX_JSON_DEPTH (counted over the containers alone) skips the walk over every
# value (check_json_value), which costs far more than the parse on a large body: ~200 ms on a 60k-message chat. Any
# of them (or an escaped backslash before "u0000") gets the walk, which decides and names the value at fault.
_NUL = re.compile(rb"\\u0000")
_HIGH = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")
_LOW = re.compile(rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}")


class StrictJSONParser(JSONParser):
    """JSON bodies whose every value the serializers, the model and the database can take: text without NUL
    (PostgreSQL refuses it) or lone UTF-16 surrogates (no encoding has them), finite numbers (1e309 reads as
    infinity), and at most MAX_JSON_DEPTH levels of nesting (deeper, parsing or rendering recurses out of
    stack). Anything else is a 400 that names where it is, before a view sees the body.

    It parses as DRF's JSONParser does (the charset a text codec, NaN and Infinity refused), with a hook on
    numbers: the body is walked value by value only when it may hold something refused (see _NUL above)."""

    def parse(self, stream, media_type=None, parser_context=None):
        encoding = (parser_context or {}).get("encoding") or settings.DEFAULT_CHARSET
        try:
            "".encode(encoding)  # a text codec: bz2_codec and the like would expand the body past its size limit
        except (LookupError, UnicodeError):
            raise ParseError(f'Unsupported charset "{encoding}" in request Content-Type header.') from None
        raw = stream.read()
        infinite: list[str] = []

        def number(text: str) -> float:
            value = float(text)
            if not math.isfinite(value):
                infinite.append(text)
            return value

        try:
            data = json.loads(raw.decode(encoding), parse_constant=strict_constant if self.strict else None, parse_float=number)
        except RecursionError:
            raise ParseError(f"JSON parse error - arrays and objects are nested more than {MAX_JSON_DEPTH} levels deep.") from None
        except ValueError as exc:  # UnicodeDecodeError included
            raise ParseError(f"JSON parse error - {exc}") from None
        if infinite or not _plainly_fine(raw, data, encoding):
            check_json_value(data)
        return data


def _plainly_fine(raw: bytes, data, encoding: str) -> bool:
    """True when ``data`` (parsed from ``raw``) surely holds no NUL, no lone surrogate (escapes searched in UTF-8
    bodies only) and no nesting deeper than MAX_JSON_DEPTH."""
    if codecs.lookup(encoding).name != "utf-8" or _NUL.search(raw):
        return False
    if b"\\u" in raw and (_HIGH.search(raw) or _LOW.search(raw)):
        # Counting escapes in the raw text is fooled by an escaped backslash before a first half (then a backslash, text
        # and a lone second half): ask the parsed value. Encoding its dump (a C loop) fails on any lone surrogate.
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except (UnicodeEncodeError, RecursionError):
            return False
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return True
    dicts, lists = [item for item in [data] if type(item) is dict], [item for item in [data] if type(item) is list]
    for _ in range(MAX_JSON_DEPTH):  # level by level, over the containers alone (C loops where it can)
        if not dicts and not lists:
            return True
        items = list(chain(chain.from_iterable(map(dict.values, dicts)), chain.from_iterable(lists)))
        kinds = set(map(type, items))
        dicts = [item for item in items if type(item) is dict] if dict in kinds else []
        lists = [item for item in items if type(item) is list] if list in kinds else []
    return not dicts and not lists


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
