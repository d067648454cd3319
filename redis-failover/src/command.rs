//! A command's name and arguments, read in place: the client classifies
//! every command it sends (read-only, blocking, its slot), so none of
//! that allocates or copies.

use redis::{Arg, Cmd};

/// `cmd`'s arguments as bytes, a cursor argument read as `cursor`.
pub(crate) fn args<'a>(cmd: &'a Cmd, cursor: &'static [u8]) -> impl Iterator<Item = &'a [u8]> {
    cmd.args_iter().map(move |arg| match arg {
        Arg::Simple(arg) => arg,
        _ => cursor,
    })
}

/// `cmd`'s name (its first argument), if it has one.
pub(crate) fn name(cmd: &Cmd) -> Option<&[u8]> {
    match cmd.args_iter().next()? {
        Arg::Simple(name) => Some(name),
        _ => None,
    }
}

/// Whether `name` is one of `names`, in any case.
pub(crate) fn is_one_of(name: &[u8], names: &[&str]) -> bool {
    names
        .iter()
        .any(|n| n.as_bytes().eq_ignore_ascii_case(name))
}
