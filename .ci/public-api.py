#!/usr/bin/env python3
"""The crate's public API, one sorted line per item, from rustdoc's JSON.

    python3 .ci/public-api.py target/doc/grpo_kernels.json > tests/public-api.txt

Every public item reachable from the crate root is listed at its path with
its signature: modules, functions and methods (generics, arguments, return
type), structs and their public fields, enums and their variants, traits and
their items, constants, type aliases, re-exports, and the trait impls of
public types (auto traits included: a lost `Send` is a breaking change;
blanket impls such as `impl<T> From<T> for T` are left out). Written for
the nightly pinned in `.ci/run` (rustdoc JSON is unstable); an unknown
format version is an error, not a silent half-listing.
"""

import json
import sys

FORMATS = range(50, 70)  # rustdoc JSON format versions this script was checked on (and near)

doc = json.load(open(sys.argv[1]))
if doc.get("format_version") not in FORMATS:
    sys.exit(f"rustdoc JSON format {doc.get('format_version')} is not one this script reads "
             f"({FORMATS.start}-{FORMATS.stop - 1}): use the nightly pinned in .ci/run")
index, paths = doc["index"], doc["paths"]
lines = set()


def ty(t):
    """A type as Rust source."""
    if t is None:
        return "_"
    (k, v), = t.items() if isinstance(t, dict) else (("primitive", t),)
    if k == "resolved_path":
        return v.get("path", v.get("name", "?")).split("::")[-1] + args(v.get("args"))
    if k in ("generic", "primitive"):
        return v
    if k == "borrowed_ref":
        lt = f"{v['lifetime']} " if v.get("lifetime") else ""
        return f"&{lt}{'mut ' if v['is_mutable'] else ''}{ty(v['type'])}"
    if k == "raw_pointer":
        return f"*{'mut' if v['is_mutable'] else 'const'} {ty(v['type'])}"
    if k == "slice":
        return f"[{ty(v)}]"
    if k == "array":
        return f"[{ty(v['type'])}; {v['len']}]"
    if k == "tuple":
        return "(" + ", ".join(ty(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    if k == "impl_trait":
        return "impl " + " + ".join(bound(b) for b in v)
    if k == "dyn_trait":
        parts = [ty({"resolved_path": p["trait"]}) for p in v["traits"]]
        if v.get("lifetime"):
            parts.append(v["lifetime"])
        return "dyn " + " + ".join(parts)
    if k == "qualified_path":
        trait = v.get("trait")
        self_ty = ty(v["self_type"])
        if trait and trait.get("path", trait.get("name")):
            return f"<{self_ty} as {ty({'resolved_path': trait})}>::{v['name']}{args(v.get('args'))}"
        return f"{self_ty}::{v['name']}{args(v.get('args'))}"
    if k == "function_pointer":
        sig = v["sig"]
        ins = ", ".join(ty(t) for _, t in sig["inputs"])
        return f"fn({ins})" + (f" -> {ty(sig['output'])}" if sig.get("output") else "")
    if k == "infer":
        return "_"
    return f"<{k}>"


def args(a):
    if not a:
        return ""
    if "angle_bracketed" in a:
        ab = a["angle_bracketed"]
        out = []
        for g in ab.get("args", []):
            (k, v), = g.items() if isinstance(g, dict) else (("infer", None),)
            out.append(v if k == "lifetime" else ty(v) if k == "type" else
                       (v.get("expr", "?") if isinstance(v, dict) else str(v)) if k == "const" else "_")
        for c in ab.get("constraints", ab.get("bindings", [])):
            b = c.get("binding", {})
            if "equality" in b:
                e = b["equality"]
                out.append(f"{c['name']} = {ty(e['type']) if 'type' in e else e}")
            else:
                out.append(f"{c['name']}: " + " + ".join(bound(x) for x in b.get("constraint", [])))
        return "<" + ", ".join(out) + ">" if out else ""
    if "parenthesized" in a:
        p = a["parenthesized"]
        return "(" + ", ".join(ty(x) for x in p["inputs"]) + ")" + (f" -> {ty(p['output'])}" if p.get("output") else "")
    return ""


def bound(b):
    if "trait_bound" in b:
        tb = b["trait_bound"]
        mod = {"maybe": "?", "maybe_const": "~const "}.get(tb.get("modifier"), "")
        return mod + ty({"resolved_path": tb["trait"]})
    if "outlives" in b:
        return b["outlives"]
    if "use" in b:
        return "use<" + ", ".join(x if isinstance(x, str) else next(iter(x.values())) for x in b["use"]) + ">"
    return "?"


def generics(g, with_where=True):
    params = []
    for p in g.get("params", []):
        kind = p["kind"]
        if "lifetime" in kind:
            params.append(p["name"])
        elif "type" in kind:
            t = kind["type"]
            if t.get("is_synthetic"):
                continue  # `impl Trait` in argument position
            s = p["name"]
            if t.get("bounds"):
                s += ": " + " + ".join(bound(b) for b in t["bounds"])
            if t.get("default"):
                s += f" = {ty(t['default'])}"
            params.append(s)
        elif "const" in kind:
            params.append(f"const {p['name']}: {ty(kind['const']['type'])}")
    out = f"<{', '.join(params)}>" if params else ""
    preds = []
    for w in g.get("where_predicates", []) if with_where else []:
        if "bound_predicate" in w:
            bp = w["bound_predicate"]
            preds.append(f"{ty(bp['type'])}: " + " + ".join(bound(b) for b in bp["bounds"]))
        elif "region_predicate" in w:
            rp = w["region_predicate"]
            preds.append(f"{rp['lifetime']}: " + " + ".join(bound(b) for b in rp["bounds"]))
        elif "eq_predicate" in w:
            preds.append(f"{ty(w['eq_predicate']['lhs'])} = {ty(w['eq_predicate']['rhs'])}")
    return out + (" where " + ", ".join(preds) if preds else "")


def fn_sig(name, f):
    h = f.get("header", {})
    quals = "".join(q for q, on in (("const ", h.get("is_const")), ("async ", h.get("is_async")),
                                    ("unsafe ", h.get("is_unsafe"))) if on)
    ins = []
    for n, t in f["sig"]["inputs"]:
        if n == "self":
            ins.append({"&Self": "&self", "&mut Self": "&mut self", "Self": "self"}.get(ty(t), f"self: {ty(t)}"))
        else:
            ins.append(f"{n}: {ty(t)}")
    g = f.get("generics", {})
    out = f["sig"].get("output")
    ret = f" -> {ty(out)}" if out else ""
    where = generics(g)[len(generics(g, False)):]
    return f"{quals}fn {name}{generics(g, False)}({', '.join(ins)}){ret}{where}"


def public(item):
    return item.get("visibility") == "public"


def emit(item, path, seen):
    """Lines for `item` reached at `path` (a list of names)."""
    iid = item["id"]
    inner_kind, inner = next(iter(item["inner"].items()))
    full = "::".join(path)
    if iid in seen and inner_kind != "use":
        lines.add(f"pub use {full} = {seen[iid]}")
        return
    seen[iid] = full
    if inner_kind == "module":
        lines.add(f"pub mod {full}")
        for child in sorted(inner["items"], key=lambda c: index.get(str(c), {}).get("name") or ""):
            visit(child, path, seen)
    elif inner_kind == "use":
        target = inner.get("id")
        name = inner["name"]
        if target is not None and str(target) in index:
            emit(index[str(target)], path[:-1] + [name], seen)
        elif inner.get("is_glob"):
            lines.add(f"pub use {full}::*  (from {inner['source']})")
        else:
            lines.add(f"pub use {'::'.join(path[:-1] + [name])} = {inner['source']}")
    elif inner_kind == "function":
        lines.add(f"pub {fn_sig(full, inner)}")
    elif inner_kind == "struct":
        g = generics(inner["generics"])
        kind = inner["kind"]
        lines.add(f"pub struct {full}{g}")
        fields = kind.get("plain", {}).get("fields", []) if isinstance(kind, dict) else []
        if isinstance(kind, dict) and "tuple" in kind:
            fields = [f for f in kind["tuple"] if f is not None]
            for i, f in enumerate(kind["tuple"]):
                if f is not None and public(index[str(f)]):
                    lines.add(f"pub {full}::{i}: {ty(index[str(f)]['inner']['struct_field'])}")
        else:
            for f in fields:
                fi = index[str(f)]
                if public(fi):
                    lines.add(f"pub {full}::{fi['name']}: {ty(fi['inner']['struct_field'])}")
        impls(inner["impls"], full)
    elif inner_kind == "enum":
        lines.add(f"pub enum {full}{generics(inner['generics'])}")
        for v in inner["variants"]:
            vi = index[str(v)]
            vk = vi["inner"]["variant"]["kind"]
            if vk == "plain":
                lines.add(f"pub {full}::{vi['name']}")
            elif "tuple" in vk:
                ts = ", ".join(ty(index[str(f)]["inner"]["struct_field"]) if f is not None else "_" for f in vk["tuple"])
                lines.add(f"pub {full}::{vi['name']}({ts})")
            else:
                lines.add(f"pub {full}::{vi['name']} {{ .. }}")
                for f in vk["struct"]["fields"]:
                    fi = index[str(f)]
                    lines.add(f"pub {full}::{vi['name']}::{fi['name']}: {ty(fi['inner']['struct_field'])}")
        impls(inner["impls"], full)
    elif inner_kind == "trait":
        sealed = " (sealed)" if any("Sealed" in bound(b) for b in inner.get("bounds", [])) else ""
        sup = ": " + " + ".join(bound(b) for b in inner["bounds"]) if inner.get("bounds") else ""
        lines.add(f"pub {'unsafe ' if inner.get('is_unsafe') else ''}trait {full}{generics(inner['generics'])}{sup}{sealed}")
        for m in inner["items"]:
            trait_item(index[str(m)], full)
    elif inner_kind == "type_alias":
        lines.add(f"pub type {full}{generics(inner['generics'])} = {ty(inner['type'])}")
    elif inner_kind == "constant":
        lines.add(f"pub const {full}: {ty(inner['type'])}")
    elif inner_kind == "static":
        lines.add(f"pub static {full}: {ty(inner['type'])}")
    elif inner_kind == "macro":
        lines.add(f"pub macro {full}!")
    else:
        lines.add(f"pub {inner_kind} {full}")


def trait_item(mi, owner):
    k, v = next(iter(mi["inner"].items()))
    if k == "function":
        lines.add(f"pub {fn_sig(owner + '::' + mi['name'], v)}")
    elif k == "assoc_type":
        b = ": " + " + ".join(bound(x) for x in v["bounds"]) if v.get("bounds") else ""
        lines.add(f"pub type {owner}::{mi['name']}{generics(v['generics'])}{b}")
    elif k == "assoc_const":
        lines.add(f"pub const {owner}::{mi['name']}: {ty(v['type'])}")


def impls(ids, owner):
    for i in ids:
        imp = index[str(i)]["inner"]["impl"]
        if imp.get("blanket_impl") is not None:
            continue
        for_ty = imp.get("for", {})
        this = owner + args(for_ty.get("resolved_path", {}).get("args"))
        if imp.get("trait") is None:  # inherent: its public items, as the type's
            for m in imp["items"]:
                mi = index[str(m)]
                if public(mi):
                    trait_item(mi, this)
            continue
        neg = "!" if imp.get("is_negative") else ""
        unsafe = "unsafe " if imp.get("is_unsafe") else ""
        lines.add(f"{unsafe}impl{generics(imp['generics'], False)} {neg}{ty({'resolved_path': imp['trait']})} "
                  f"for {this}{generics(imp['generics'])[len(generics(imp['generics'], False)):]}")


def visit(iid, path, seen):
    item = index.get(str(iid))
    if item is None or not public(item) and next(iter(item["inner"])) != "impl":
        return
    if next(iter(item["inner"])) == "impl":
        return
    name = item.get("name")
    emit(item, path + ([name] if name and next(iter(item["inner"])) != "use" else
                       [item["inner"]["use"]["name"]] if "use" in item["inner"] else []), seen)


root = index[str(doc["root"])]
emit(root, [root["name"]], {})
print("\n".join(sorted(lines)))
