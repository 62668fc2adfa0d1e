//! `IBEACON_READ`, `HTTP_COAP_REQUEST`, `COAP_HTTP_RESPONSE`: recorded in
//! `events` only. The transaction writes that row (it is the inbox), so the
//! handler has nothing left to do; any `data` is accepted.

use futures_util::future::BoxFuture;
use sqlx::PgConnection;

use super::{Context, Handler, Typed};
use crate::envelope::Message;
use crate::failure::Failure;

/// The inbox row is the whole effect.
pub struct RecordOnly;

pub static RECORD_ONLY: RecordOnly = RecordOnly;

impl Handler for RecordOnly {
    type Item = ();

    fn prepare(&self, _: &Message, _: &Context<'_>) -> Result<(), Failure> {
        Ok(())
    }

    fn write<'a>(&'a self, _: &'a mut PgConnection, _: &'a [Typed<'a, ()>]) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async { Ok(()) })
    }
}
