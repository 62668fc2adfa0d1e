//! `IBEACON_READ`, `HTTP_COAP_REQUEST`, `COAP_HTTP_RESPONSE`: recorded in
//! `events` only. The pipeline writes that row (it is the inbox), so the
//! handler has nothing left to do; any `data` is accepted.

use futures_util::future::BoxFuture;
use sqlx::PgConnection;

use super::Bulk;
use crate::envelope::Message;
use crate::failure::Failure;

pub fn apply<'a>(_: &'a mut PgConnection, _: &'a Message) -> BoxFuture<'a, Result<(), Failure>> {
    Box::pin(async { Ok(()) })
}

/// In a batch the inbox statement is the whole effect.
pub static BULK: Bulk = Bulk {
    check: |_| Ok(()),
    apply_many: |_, _| Box::pin(async { Ok(()) }),
};
