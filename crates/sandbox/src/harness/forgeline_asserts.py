"""Rewrites `assert left <op> right` so that a failing assertion reports both values.

Python's AssertionError carries no values; pytest gets them by rewriting asserts, and so do we,
for every file the harness loads itself. Each operand is still evaluated once, in order, in its
own scope: the rewritten assert calls a helper with the operands instead of comparing in place.
"""
import ast
import builtins

HELPER = "__forgeline_compare__"

_OPS = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Is: "is",
    ast.IsNot: "is not",
}

_COMPARE = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "in": lambda a, b: a in b,
    "not in": lambda a, b: a not in b,
    "is": lambda a, b: a is b,
    "is not": lambda a, b: a is not b,
}


def install(ctx):
    """Makes the helper that rewritten asserts call visible to every module."""

    def compare(left, op, right, path, line):
        result = _COMPARE[op](left, right)
        if not result:
            ctx.last_compare = (path, line, op, left, right)
        return result

    setattr(builtins, HELPER, compare)


class _Rewriter(ast.NodeTransformer):
    def __init__(self, path):
        self.path = path

    def visit_Assert(self, node):
        test = node.test
        if isinstance(test, ast.Compare) and len(test.ops) == 1 and type(test.ops[0]) in _OPS:
            call = ast.Call(
                func=ast.Name(id=HELPER, ctx=ast.Load()),
                args=[
                    test.left,
                    ast.Constant(_OPS[type(test.ops[0])]),
                    test.comparators[0],
                    ast.Constant(self.path),
                    ast.Constant(node.lineno),
                ],
                keywords=[],
            )
            node.test = ast.copy_location(call, test)
        self.generic_visit(node)
        return node


def compile_rewritten(source, path):
    """Compiles source like compile(), with its asserts rewritten. Raises SyntaxError as compile()."""
    tree = ast.parse(source, filename=path)
    tree = ast.fix_missing_locations(_Rewriter(path).visit(tree))
    return compile(tree, path, "exec", dont_inherit=True)
