"""celslm keys: producer signing keys and recipients' encryption keys."""

from __future__ import annotations

from typing import Annotated

import typer

from celslm.errors import UsageError
from celslm.trust import generate_key, key_id, load_public_key
from .common import ForceOpt, JsonOpt, examples, log, print_json

app = typer.Typer(help="Make and show keys: Ed25519 to sign artifacts and tags, X25519 to receive encrypted contexts.",
                  no_args_is_help=True)

GENERATE_EPILOG = examples(
    "celslm keys generate --out cloud            # cloud.key (0600) and cloud.pub: sign with --sign cloud.key",
    "celslm decode -m M --kv sched:latest --cloud http://cloud:8470 --trust cloud.pub -p 'Why?'",
    "celslm keys generate --out edge1 --for encryption   # edge1.pub goes to prefill --encrypt-to",
)
ID_EPILOG = examples("celslm keys id cloud.pub", "celslm keys id cloud.pub --json")


@app.command(epilog=GENERATE_EPILOG)
def generate(
    out: Annotated[str, typer.Option("--out", "-o", help="Name of the pair: writes NAME.key (private, mode 0600) and NAME.pub.")],
    for_: Annotated[str, typer.Option("--for", help="signing (Ed25519: prefill/compress/push --sign) or encryption (X25519: prefill --encrypt-to).")] = "signing",
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Write a new key pair: NAME.key (keep it secret) and NAME.pub (give it out)."""
    if for_ not in ("signing", "encryption"):
        raise UsageError(f"--for {for_!r}: choose signing or encryption")
    key_path, pub_path = generate_key(out, force=force, kind=for_)
    ident = key_id(load_public_key(pub_path, for_))
    if json_:
        print_json({"key": str(key_path), "pub": str(pub_path), "id": ident, "for": for_})
    else:
        log(f"wrote {key_path} (private, mode 0600) and {pub_path} (public); key id {ident}")


@app.command("id", epilog=ID_EPILOG)
def id_(
    pub: Annotated[str, typer.Argument(help="A public key file (PEM).")],
    json_: JsonOpt = False,
) -> None:
    """Print a public key's id: the name signatures, errors and `verify` give it."""
    try:
        raw, kind = load_public_key(pub, "signing"), "signing"
    except UsageError:
        raw, kind = load_public_key(pub, "encryption"), "encryption"
    if json_:
        print_json({"id": key_id(raw), "for": kind})
    else:
        print(key_id(raw))
