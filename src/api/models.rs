//! The `lmserve.v1.Models` service: what the registry holds and in what state.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::proto::models_server::Models;
use super::proto::{self};
use crate::error::{Error, Task};
use crate::registry::manifest::{Family, Manifest};
use crate::registry::{LoadState, Registry, Slot, parse_target};

pub struct ModelsService {
    registry: Arc<Registry>,
}

impl ModelsService {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }
}

#[tonic::async_trait]
impl Models for ModelsService {
    async fn list_models(
        &self,
        _: Request<proto::ListModelsRequest>,
    ) -> Result<Response<proto::ListModelsResponse>, Status> {
        let mut models: Vec<proto::ModelInfo> = Vec::new();
        for slot in self.registry.slots() {
            match models.last_mut() {
                Some(info) if info.name == slot.model => info.versions.push(describe(&slot)),
                _ => models.push(proto::ModelInfo {
                    name: slot.model.clone(),
                    versions: vec![describe(&slot)],
                }),
            }
        }
        Ok(Response::new(proto::ListModelsResponse { models }))
    }

    async fn get_model(
        &self,
        request: Request<proto::GetModelRequest>,
    ) -> Result<Response<proto::ModelInfo>, Status> {
        let target = request.into_inner().name;
        let (name, version) = parse_target(&target).map_err(|error| match error {
            Error::InvalidArgument { message, .. } => Error::invalid("name", message),
            other => other,
        })?;
        let slots = self
            .registry
            .model_slots(name)
            .ok_or_else(|| Error::ModelNotFound {
                name: name.to_owned(),
            })?;
        let versions: Vec<proto::ModelVersion> = slots
            .iter()
            .filter(|slot| version.is_none_or(|v| v == slot.version))
            .map(|slot| describe(slot))
            .collect();
        if versions.is_empty() {
            return Err(Error::VersionNotFound {
                model: name.to_owned(),
                version: version.map(|v| v.to_string()).unwrap_or_default(),
                available: slots
                    .iter()
                    .map(|slot| slot.version.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }
            .into());
        }
        Ok(Response::new(proto::ModelInfo {
            name: name.to_owned(),
            versions,
        }))
    }
}

fn describe(slot: &Slot) -> proto::ModelVersion {
    let mut info = proto::ModelVersion {
        version: slot.version.to_string(),
        ..Default::default()
    };
    match slot.state() {
        LoadState::Loading => info.state = proto::LoadState::Loading as i32,
        LoadState::Failed(reason) => {
            info.state = proto::LoadState::Failed as i32;
            info.load_error = reason;
            // A failed load may still have a readable manifest worth showing.
            if let Ok(manifest) = Manifest::read(&slot.path) {
                describe_manifest(&mut info, &manifest);
            }
        }
        LoadState::Ready(model) => {
            info.state = proto::LoadState::Ready as i32;
            describe_manifest(&mut info, &model.manifest);
            info.execution_provider = model.pool.provider().to_string();
            let tensor = |spec: &crate::runtime::TensorSpec| proto::TensorInfo {
                name: spec.name.clone(),
                dtype: spec.dtype.clone(),
                shape: spec.shape.clone(),
            };
            info.inputs = model.pool.inputs().iter().map(tensor).collect();
            info.outputs = model.pool.outputs().iter().map(tensor).collect();
        }
    }
    info
}

fn describe_manifest(info: &mut proto::ModelVersion, manifest: &Manifest) {
    info.family = match manifest.family {
        Family::Decoder => proto::Family::Decoder,
        Family::Rnn => proto::Family::Rnn,
        Family::Encoder => proto::Family::Encoder,
    } as i32;
    info.tasks = manifest
        .tasks
        .iter()
        .map(|task| match task {
            Task::Generate => proto::Task::Generate,
            Task::Embed => proto::Task::Embed,
            Task::Classify => proto::Task::Classify,
        } as i32)
        .collect();
    info.max_length = manifest.max_length as u32;
    info.labels = manifest
        .classify
        .as_ref()
        .map(|c| c.labels.clone())
        .unwrap_or_default();
    info.description = manifest.description.clone();
}
