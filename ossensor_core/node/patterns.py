"""POSIX extended regular expressions with the semantics of GNU ``grep -E``.

The guide says the include and exclude lists use egrep syntax. Python's ``re`` is not that syntax:
it reads ``[[:digit:]]`` as a set of characters followed by ``]``, treats ``\\`` inside brackets as an
escape, and differs on intervals such as ``a{,2}``. Rather than translate, we call the GNU regex
engine in the C library, the same engine (and the same syntax bits) that GNU grep uses for ``-E``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

# Syntax bits from glibc's <regex.h>; RE_SYNTAX_EGREP is what grep -E compiles with.
_RE_CHAR_CLASSES = 1 << 2
_RE_CONTEXT_INDEP_ANCHORS = 1 << 3
_RE_CONTEXT_INDEP_OPS = 1 << 4
_RE_CONTEXT_INVALID_OPS = 1 << 5
_RE_DOT_NEWLINE = 1 << 6
_RE_DOT_NOT_NULL = 1 << 7
_RE_INTERVALS = 1 << 9
_RE_NEWLINE_ALT = 1 << 11
_RE_NO_BK_BRACES = 1 << 12
_RE_NO_BK_PARENS = 1 << 13
_RE_NO_BK_VBAR = 1 << 15
_RE_NO_EMPTY_RANGES = 1 << 16
_RE_UNMATCHED_RIGHT_PAREN_ORD = 1 << 17
_RE_INVALID_INTERVAL_ORD = 1 << 21
_RE_NO_SUB = 1 << 25

_POSIX_COMMON = _RE_CHAR_CLASSES | _RE_DOT_NEWLINE | _RE_DOT_NOT_NULL | _RE_INTERVALS | _RE_NO_EMPTY_RANGES
_POSIX_EXTENDED = (
    _POSIX_COMMON
    | _RE_CONTEXT_INDEP_ANCHORS
    | _RE_CONTEXT_INDEP_OPS
    | _RE_NO_BK_BRACES
    | _RE_NO_BK_PARENS
    | _RE_NO_BK_VBAR
    | _RE_CONTEXT_INVALID_OPS
    | _RE_UNMATCHED_RIGHT_PAREN_ORD
)
RE_SYNTAX_EGREP = (_POSIX_EXTENDED | _RE_INVALID_INTERVAL_ORD | _RE_NEWLINE_ALT) & ~(
    _RE_CONTEXT_INVALID_OPS | _RE_DOT_NOT_NULL
)

# struct re_pattern_buffer is 64 bytes on 64-bit glibc; a larger zeroed buffer is harmless.
_PATTERN_BUFFER_SIZE = 256

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.re_set_syntax.argtypes = [ctypes.c_ulong]
_libc.re_set_syntax.restype = ctypes.c_ulong
_libc.re_compile_pattern.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.re_compile_pattern.restype = ctypes.c_char_p
_libc.re_search.argtypes = [
    ctypes.c_void_p,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_void_p,
]
_libc.re_search.restype = ctypes.c_int
_libc.regfree.argtypes = [ctypes.c_void_p]
_libc.regfree.restype = None

# re_set_syntax sets a process-wide variable that re_compile_pattern reads.
_compile_lock = threading.Lock()


class PatternError(ValueError):
    """The pattern is not a valid extended regular expression; the message is the C library's."""

    def __init__(self, pattern: str, reason: str) -> None:
        self.pattern = pattern
        self.reason = reason
        super().__init__(f"{pattern!r}: {reason}")


class ExtendedRegex:
    """One compiled ``grep -E`` pattern, matched unanchored like grep matches a line."""

    __slots__ = ("pattern", "_buffer")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        encoded = pattern.encode()
        self._buffer = ctypes.create_string_buffer(_PATTERN_BUFFER_SIZE)
        with _compile_lock:
            _libc.re_set_syntax(RE_SYNTAX_EGREP | _RE_NO_SUB)
            error = _libc.re_compile_pattern(encoded, len(encoded), self._buffer)
        if error is not None:
            raise PatternError(pattern, error.decode())

    def search(self, text: str) -> bool:
        """True when the pattern matches anywhere in ``text`` (one line, as grep sees it)."""
        data = text.encode()
        position = _libc.re_search(self._buffer, data, len(data), 0, len(data), None)
        if position == -2:
            raise RuntimeError(f"regex engine failed on pattern {self.pattern!r}")
        return position >= 0

    def __del__(self) -> None:
        buffer = getattr(self, "_buffer", None)
        if buffer is not None:
            _libc.regfree(buffer)

    def __repr__(self) -> str:
        return f"ExtendedRegex({self.pattern!r})"
