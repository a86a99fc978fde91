//! Extension replies, as the router reads them (`beamline_model::wire`): the body is
//! parsed as JSON, its shape checked against the limits (the invoker does this before
//! anything else), then interpreted for every extension type; a pre/post update is
//! applied to a message.
//! Must never panic; errors are fine. Checked invariants: an update that fails leaves
//! the message exactly as it was, and an extension never changes the message's ids.
#![no_main]

use beamline_model::wire::{Message, Reply, ReplyError};
use beamline_model::{ExtensionType, Limits};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    if Limits::default().check_json_shape(&value).is_err() {
        return;
    }
    for ext_type in ExtensionType::ALL {
        let reply = Reply::parse(ext_type, value.clone(), None);
        if let Ok(Reply::Transform {
            message: Some(update),
            metadata: _,
        }) = reply
        {
            let mut fresh = Message::default();
            if update.clone().apply(&mut fresh).is_err() {
                assert_eq!(
                    fresh,
                    Message::default(),
                    "a failed update changed the message"
                );
            }
            let original = Message {
                message_id: "m-1".into(),
                tenant_id: "acme".into(),
                trace_id: "t-1".into(),
                message_type: "chat".into(),
                payload: "hello".into(),
                payload_ref: None,
                metadata: Default::default(),
            };
            let mut m = original.clone();
            match update.apply(&mut m) {
                Ok(()) => assert_eq!(
                    (&m.message_id, &m.tenant_id, &m.trace_id),
                    (
                        &original.message_id,
                        &original.tenant_id,
                        &original.trace_id
                    ),
                    "an extension re-addressed the message"
                ),
                Err(_) => assert_eq!(m, original, "a failed update changed the message"),
            }
        }
        // The NATS micro error headers make any body an extension error.
        let e = Reply::parse(ext_type, value.clone(), Some(("500".into(), "boom".into())));
        assert!(matches!(e, Err(ReplyError::Extension { .. })));
    }
});
