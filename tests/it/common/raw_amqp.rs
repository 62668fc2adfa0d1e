//! A tiny AMQP 0-9-1 publisher that writes frames by hand, so a test can
//! send what no client library would: property bytes that are not UTF-8,
//! header tables nested thousands of levels deep. It speaks just enough of
//! the protocol for one `basic.publish` to the default exchange.

use std::io;
use std::str::FromStr;

use lapin::uri::AMQPUri;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_END: u8 = 0xCE;

/// Property flag bits of `basic` (AMQP 0-9-1, section 4.2.6).
pub const FLAG_HEADERS: u16 = 1 << 13;
pub const FLAG_MESSAGE_ID: u16 = 1 << 7;

/// Publishes `body` to queue `queue` through the default exchange, with
/// `properties`: the already encoded property list for `flags`, in flag
/// order. Connects to the broker of `url` (an `AMQP_URL`: compose's broker
/// knows the user `iot`, not `guest`) as its user, in its vhost.
///
/// # Errors
/// Any I/O error, a URL lapin cannot read, or an unexpected answer from the
/// broker.
pub async fn publish(url: &str, queue: &str, flags: u16, properties: &[u8], body: &[u8]) -> io::Result<()> {
    let uri = AMQPUri::from_str(url).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut socket = TcpStream::connect((uri.authority.host.as_str(), uri.authority.port)).await?;
    socket.write_all(b"AMQP\x00\x00\x09\x01").await?;
    expect_method(&mut socket, 10, 10).await?; // connection.start
    let mut start_ok = method(10, 11);
    start_ok.extend(0u32.to_be_bytes()); // client properties: empty table
    short(&mut start_ok, b"PLAIN");
    let user = &uri.authority.userinfo;
    long(
        &mut start_ok,
        format!("\0{}\0{}", user.username, user.password).as_bytes(),
    );
    short(&mut start_ok, b"en_US");
    send(&mut socket, FRAME_METHOD, 0, &start_ok).await?;
    let tune = expect_method(&mut socket, 10, 30).await?;
    let mut tune_ok = method(10, 31);
    tune_ok.extend(&tune[4..10]); // the broker's channel-max and frame-max
    tune_ok.extend(0u16.to_be_bytes()); // no heartbeat
    send(&mut socket, FRAME_METHOD, 0, &tune_ok).await?;
    let mut open = method(10, 40);
    short(&mut open, uri.vhost.as_bytes());
    short(&mut open, b"");
    open.push(0);
    send(&mut socket, FRAME_METHOD, 0, &open).await?;
    expect_method(&mut socket, 10, 41).await?;
    let mut channel_open = method(20, 10);
    short(&mut channel_open, b"");
    send(&mut socket, FRAME_METHOD, 1, &channel_open).await?;
    expect_method(&mut socket, 20, 11).await?;

    let mut publish = method(60, 40);
    publish.extend(0u16.to_be_bytes());
    short(&mut publish, b"");
    short(&mut publish, queue.as_bytes());
    publish.push(0);
    send(&mut socket, FRAME_METHOD, 1, &publish).await?;
    let mut header = Vec::new();
    header.extend(60u16.to_be_bytes());
    header.extend(0u16.to_be_bytes());
    header.extend((body.len() as u64).to_be_bytes());
    header.extend(flags.to_be_bytes());
    header.extend(properties);
    send(&mut socket, FRAME_HEADER, 1, &header).await?;
    send(&mut socket, FRAME_BODY, 1, body).await?;

    // A clean close: the broker has routed the publish before it answers.
    let mut close = method(10, 50);
    close.extend(200u16.to_be_bytes());
    short(&mut close, b"");
    close.extend([0, 0, 0, 0]);
    send(&mut socket, FRAME_METHOD, 0, &close).await?;
    expect_method(&mut socket, 10, 51).await?;
    Ok(())
}

/// A `short string` of the protocol: length byte, then the bytes as given.
pub fn short(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(u8::try_from(bytes.len()).expect("a short string is at most 255 bytes"));
    out.extend(bytes);
}

/// A `long string`: length as u32, then the bytes.
pub fn long(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend((bytes.len() as u32).to_be_bytes());
    out.extend(bytes);
}

/// A header table `{"x-deep": {"a": {"a": … }}}`, `levels` tables deep. A
/// table holding k levels of `"a"` entries is 7k bytes long.
pub fn deep_table(levels: u32) -> Vec<u8> {
    let mut inner = (7 * levels).to_be_bytes().to_vec();
    for k in (0..levels).rev() {
        inner.extend([1, b'a', b'F']);
        inner.extend((7 * k).to_be_bytes());
    }
    let mut table = Vec::new();
    table.extend(((1 + 6 + 1 + inner.len()) as u32).to_be_bytes());
    short(&mut table, b"x-deep");
    table.push(b'F');
    table.extend(inner);
    table
}

fn method(class: u16, method: u16) -> Vec<u8> {
    let mut out = class.to_be_bytes().to_vec();
    out.extend(method.to_be_bytes());
    out
}

async fn send(socket: &mut TcpStream, kind: u8, channel: u16, payload: &[u8]) -> io::Result<()> {
    let mut frame = vec![kind];
    frame.extend(channel.to_be_bytes());
    frame.extend((payload.len() as u32).to_be_bytes());
    frame.extend(payload);
    frame.push(FRAME_END);
    socket.write_all(&frame).await
}

/// Reads frames until a method frame, which must be `class.method`;
/// returns its payload.
async fn expect_method(socket: &mut TcpStream, class: u16, method: u16) -> io::Result<Vec<u8>> {
    loop {
        let mut head = [0u8; 7];
        socket.read_exact(&mut head).await?;
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut payload = vec![0u8; size + 1];
        socket.read_exact(&mut payload).await?;
        payload.pop(); // frame end
        if head[0] != FRAME_METHOD {
            continue;
        }
        let got = (
            u16::from_be_bytes([payload[0], payload[1]]),
            u16::from_be_bytes([payload[2], payload[3]]),
        );
        if got != (class, method) {
            return Err(io::Error::other(format!(
                "expected method {class}.{method}, got {}.{} ({})",
                got.0,
                got.1,
                String::from_utf8_lossy(&payload)
            )));
        }
        return Ok(payload);
    }
}
