//! The deadline a client sent in `grpc-timeout`, for responses that tonic does not time itself:
//! tonic's own timeout covers a call until its response headers, not a stream's messages.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::time::Instant;
use tonic::Extensions;
use tonic::Status;
use tonic::metadata::MetadataMap;

pub const HEADER: &str = "grpc-timeout";

/// When the call arrived: stamped by `edge` as it enters the service stack, before it waits for
/// a worker thread, so that a busy server does not count its own backlog as the client's time.
#[derive(Debug, Clone, Copy)]
pub struct Arrival(pub Instant);

/// tonic starts its own timer for `grpc-timeout` a moment before `edge` runs; the server gives
/// up this much earlier, so that the client hears DEADLINE_EXCEEDED rather than tonic's
/// CANCELLED. A call's deadline inside the server is that earlier instant.
pub const ANSWER_LEAD: Duration = Duration::from_millis(5);

/// A call's deadline, when it has one: the instant and the timeout the client sent.
pub type Deadline = Option<(Instant, Duration)>;

/// When the server gives up on the call (`ANSWER_LEAD` before its `grpc-timeout` runs out),
/// counted from its arrival (or from now, for a call
/// that did not pass `edge`), with the timeout itself; `None` when the client set none or sent
/// one that does not parse (as tonic treats it).
pub fn from_request(metadata: &MetadataMap, extensions: &Extensions) -> Deadline {
    let timeout = parse(metadata.get(HEADER)?.to_str().ok()?)?;
    let arrived = extensions
        .get::<Arrival>()
        .map_or_else(Instant::now, |arrival| arrival.0);
    let budget = timeout.saturating_sub(ANSWER_LEAD);
    Some((arrived.checked_add(budget)?, timeout))
}

/// The sooner of `deadline` and a limit the request itself carries (Triton's `timeout`),
/// counted from now.
pub fn sooner(deadline: Deadline, limit: Option<Duration>) -> Deadline {
    let Some(limit) = limit else {
        return deadline;
    };
    let own = Instant::now().checked_add(limit).map(|at| (at, limit));
    match (deadline, own) {
        (Some(call), Some(own)) if call.0 <= own.0 => Some(call),
        (_, Some(own)) => Some(own),
        (call, None) => call,
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// `stream` until the call's deadline, then DEADLINE_EXCEEDED. Ending the stream drops the work
/// behind it (a generation frees its batch slot within one decode step), as a client's
/// cancellation does; this covers clients that let the deadline pass without cancelling.
pub fn until<T: Send + 'static>(stream: BoxStream<T>, deadline: Deadline) -> BoxStream<T> {
    let Some((at, timeout)) = deadline else {
        return stream;
    };
    Box::pin(futures::stream::unfold(
        Some(stream),
        move |stream| async move {
            let mut stream = stream?;
            match tokio::time::timeout_at(at, stream.next()).await {
                Ok(Some(item)) => Some((item, Some(stream))),
                Ok(None) => None,
                Err(_) => Some((
                    Err(Status::deadline_exceeded(format!(
                        "the call's deadline (grpc-timeout {timeout:?}) passed before the stream finished"
                    ))),
                    None,
                )),
            }
        },
    ))
}

/// `grpc-timeout`'s form: at most 8 digits, then a unit (H, M, S, m, u, n).
pub fn parse(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sooner_of_the_call_s_deadline_and_the_request_s_own_limit_holds() {
        let second = Duration::from_secs(1);
        let hour = Duration::from_secs(3600);
        let at = Instant::now() + second;
        let call = Some((at, second));
        assert_eq!(sooner(call, None), call);
        assert_eq!(sooner(call, Some(hour)), call);
        let own = sooner(call, Some(Duration::from_millis(10))).unwrap();
        assert_eq!(own.1, Duration::from_millis(10));
        assert!(own.0 < at);
        assert_eq!(sooner(None, Some(hour)).unwrap().1, hour);
        assert_eq!(sooner(None, None), None);
    }

    #[test]
    fn parses_every_unit_and_rejects_the_rest() {
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "m", "5", "5s", "123456789m", "-5m", "1.5S", "5 m", "é"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reads_the_header_from_metadata_counting_from_arrival_less_the_answer_lead() {
        let mut metadata = MetadataMap::new();
        let mut extensions = Extensions::new();
        assert!(from_request(&metadata, &extensions).is_none());
        metadata.insert(HEADER, "40m".parse().unwrap());
        let (deadline, timeout) = from_request(&metadata, &extensions).unwrap();
        assert_eq!(timeout, Duration::from_millis(40));
        assert!(deadline <= Instant::now() + timeout);
        let arrived = Instant::now() - Duration::from_millis(30);
        extensions.insert(Arrival(arrived));
        let (deadline, _) = from_request(&metadata, &extensions).unwrap();
        assert_eq!(deadline, arrived + timeout - ANSWER_LEAD);
        // A timeout shorter than the lead: the server gives up as the call arrives.
        metadata.insert(HEADER, "2m".parse().unwrap());
        assert_eq!(from_request(&metadata, &extensions).unwrap().0, arrived);
    }
}
