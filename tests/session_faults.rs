//! A panic inside a session run, injected into a real session pool: that run fails with the
//! reason, the session goes back to the pool, nothing is poisoned, and the next run succeeds.

mod common;

use lmserve::error::Error;
use lmserve::runtime::bindings::Bindings;
use lmserve::runtime::encoder::{self, Embedding, EncoderRow, Pooling};

#[tokio::test]
async fn a_panicking_run_fails_alone_and_returns_its_session() {
    let model = common::fixtures().join("pooled-encoder/1/model.onnx");
    let pool = std::sync::Arc::new(common::cpu_session_pool(&model, 1));
    let bindings = Bindings {
        input_ids: "input_ids".into(),
        attention_mask: Some("attention_mask".into()),
        position_ids: None,
        first_position: 0,
        token_type_ids: Some("token_type_ids".into()),
        logits: None,
        hidden_states: Some("token_embeddings".into()),
        pooled_output: Some("sentence_embedding".into()),
        state: Vec::new(),
        seqlens_k: None,
        total_sequence_length: None,
    };
    let row = || EncoderRow {
        ids: vec![2, 5, 3],
        embedding: Some(Embedding::Pooled),
        pool_from: 0,
        logits: false,
        ..EncoderRow::default()
    };

    for _ in 0..3 {
        let failed = pool
            .acquire()
            .await
            .run(|_session| -> Vec<f32> { panic!("injected fault") })
            .await;
        match failed {
            Err(Error::Internal(reason)) => assert!(reason.contains("injected fault"), "{reason}"),
            other => panic!("expected an internal error, got {other:?}"),
        }
        // The pool's one session is free again and unpoisoned.
        let bindings = bindings.clone();
        let outputs = pool
            .acquire()
            .await
            .run(move |session| encoder::run(session, &bindings, 0, &[row()]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(outputs[0].pooled.as_ref().unwrap().len(), 8);
    }
    // Pooling over the per-token states agrees with the graph's own pooled output.
    let pooled = pool
        .acquire()
        .await
        .run(move |session| {
            encoder::run(
                session,
                &bindings,
                0,
                &[
                    row(),
                    EncoderRow {
                        embedding: Some(Embedding::Pool(Pooling::Mean)),
                        ..row()
                    },
                ],
            )
        })
        .await
        .unwrap()
        .unwrap();
    let (a, b) = (
        pooled[0].pooled.as_ref().unwrap(),
        pooled[1].pooled.as_ref().unwrap(),
    );
    assert!(common::max_abs_diff(a, b) < 1e-6);
}
