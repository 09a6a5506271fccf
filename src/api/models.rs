//! The `lmserve.v1.Models` service: what the registry holds and in what state.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::proto::models_server::Models;
use super::proto::{self};
use crate::config::LimitsConfig;
use crate::config::routes::{ArmConfig, RouteConfig, ShadowConfig};
use crate::error::{Error, Task};
use crate::registry::manifest::{Family, Manifest};
use crate::registry::{Listed, LoadState, Registry, RouteEntry, RouteSource, Slot, parse_target};
use crate::runtime::{GraphIo, TensorSpec};
use crate::tasks::limits::{check_name, check_target};

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
    async fn load_model(
        &self,
        request: Request<proto::LoadModelRequest>,
    ) -> Result<Response<proto::ModelInfo>, Status> {
        let request = request.into_inner();
        // On a task of its own, so a load that outlives the call (its deadline, a client gone)
        // still finishes and is installed; dropped with the call, a load already running on a
        // blocking thread would be thrown away when done, and a retry would load it again.
        let registry = Arc::clone(&self.registry);
        let (name, version) = (request.name.clone(), request.version);
        tokio::spawn(async move { registry.load_model(&name, version).await })
            .await
            .map_err(|error| Error::Internal(format!("the load stopped: {error}")))??;
        self.get_model(Request::new(proto::GetModelRequest { name: request.name }))
            .await
    }

    async fn unload_model(
        &self,
        request: Request<proto::UnloadModelRequest>,
    ) -> Result<Response<proto::UnloadModelResponse>, Status> {
        let request = request.into_inner();
        let versions = self.registry.unload_model(&request.name, request.version)?;
        Ok(Response::new(proto::UnloadModelResponse {
            versions: versions.iter().map(u64::to_string).collect(),
        }))
    }

    async fn set_route(
        &self,
        request: Request<proto::SetRouteRequest>,
    ) -> Result<Response<proto::Route>, Status> {
        let route = request
            .into_inner()
            .route
            .ok_or_else(|| Error::invalid("route", "is missing"))?;
        let (name, config) = route_config(route, &self.registry.config().limits)?;
        self.registry.set_route(&name, config)?;
        Ok(Response::new(route_message(
            &name,
            &self.registry.get_route(&name)?,
        )))
    }

    async fn delete_route(
        &self,
        request: Request<proto::DeleteRouteRequest>,
    ) -> Result<Response<proto::DeleteRouteResponse>, Status> {
        let name = request.into_inner().name;
        check_name("name", &name, &self.registry.config().limits)?;
        self.registry.delete_route(&name)?;
        Ok(Response::new(proto::DeleteRouteResponse {}))
    }

    async fn get_route(
        &self,
        request: Request<proto::GetRouteRequest>,
    ) -> Result<Response<proto::Route>, Status> {
        let name = request.into_inner().name;
        check_name("name", &name, &self.registry.config().limits)?;
        Ok(Response::new(route_message(
            &name,
            &self.registry.get_route(&name)?,
        )))
    }

    async fn list_routes(
        &self,
        _: Request<proto::ListRoutesRequest>,
    ) -> Result<Response<proto::ListRoutesResponse>, Status> {
        let routes = self
            .registry
            .list_routes()
            .iter()
            .map(|(name, route)| route_message(name, route))
            .collect();
        Ok(Response::new(proto::ListRoutesResponse { routes }))
    }

    async fn list_models(
        &self,
        _: Request<proto::ListModelsRequest>,
    ) -> Result<Response<proto::ListModelsResponse>, Status> {
        let models = reading_the_repository(&self.registry, |registry| {
            Ok(registry
                .catalogue()?
                .into_iter()
                .map(|(name, versions)| proto::ModelInfo {
                    name,
                    versions: versions.iter().map(describe).collect(),
                })
                .collect())
        })
        .await?;
        Ok(Response::new(proto::ListModelsResponse { models }))
    }

    async fn get_model(
        &self,
        request: Request<proto::GetModelRequest>,
    ) -> Result<Response<proto::ModelInfo>, Status> {
        let target = request.into_inner().name;
        check_target("name", &target, &self.registry.config().limits)?;
        let (name, version) = parse_target(&target).map_err(|error| match error {
            Error::InvalidArgument { message, .. } => Error::invalid("name", message),
            other => other,
        })?;
        let wanted = name.to_owned();
        let (listed, versions) = reading_the_repository(&self.registry, move |registry| {
            let mut catalogue = registry.catalogue()?;
            let listed = catalogue
                .remove(&wanted)
                .ok_or(Error::ModelNotFound { name: wanted })?;
            let versions: Vec<proto::ModelVersion> = listed
                .iter()
                .filter(|listed| version.is_none_or(|v| v == listed.version()))
                .map(describe)
                .collect();
            Ok((listed, versions))
        })
        .await?;
        if versions.is_empty() {
            let version = version.map(|v| v.to_string()).unwrap_or_default();
            return Err(Error::version_not_found(
                name,
                version,
                listed.iter().map(Listed::version),
            )
            .into());
        }
        Ok(Response::new(proto::ModelInfo {
            name: name.to_owned(),
            versions,
        }))
    }
}

/// `work` over the catalogue on the blocking pool: it scans the repository and reads the
/// manifests of versions not loaded, which on network storage take as long as the storage does,
/// and an async worker waiting for that would hold up every call it serves.
async fn reading_the_repository<T: Send + 'static>(
    registry: &Arc<Registry>,
    work: impl FnOnce(&Registry) -> crate::error::Result<T> + Send + 'static,
) -> Result<T, Status> {
    let registry = Arc::clone(registry);
    match tokio::task::spawn_blocking(move || work(&registry)).await {
        Ok(result) => result.map_err(Status::from),
        Err(error) => Err(Error::Internal(format!("reading the repository: {error}")).into()),
    }
}

fn describe(listed: &Listed) -> proto::ModelVersion {
    match listed {
        Listed::Slot(slot) => describe_slot(slot),
        Listed::Unloaded(dir) => {
            let mut info = proto::ModelVersion {
                version: dir.version.to_string(),
                state: proto::LoadState::Unloaded as i32,
                ..Default::default()
            };
            if let Ok(manifest) = Manifest::read(&dir.path) {
                describe_manifest(&mut info, &manifest);
            }
            info
        }
    }
}

fn describe_slot(slot: &Slot) -> proto::ModelVersion {
    let mut info = proto::ModelVersion {
        version: slot.version.to_string(),
        ..Default::default()
    };
    match slot.state() {
        LoadState::Loading => info.state = proto::LoadState::Loading as i32,
        LoadState::Failed(failure) => {
            info.state = proto::LoadState::Failed as i32;
            info.load_error = failure.reason.clone();
            // A failed load may still have a readable manifest and graph worth showing.
            if let Ok(manifest) = Manifest::read(&slot.path) {
                describe_manifest(&mut info, &manifest);
                info.max_length = manifest.max_length.unwrap_or(0) as u32;
            }
            if let Some(graph) = &failure.graph {
                describe_graph(&mut info, graph);
            }
        }
        LoadState::Ready(model) => {
            info.state = proto::LoadState::Ready as i32;
            describe_manifest(&mut info, &model.manifest);
            info.execution_provider = model.pool.provider().to_string();
            describe_graph(&mut info, model.pool.graph());
            let settings = &model.settings;
            info.max_length = settings.max_length.value as u32;
            info.labels = settings
                .classify
                .as_ref()
                .map(|classify| classify.labels.value.clone())
                .unwrap_or_default();
            info.settings = settings
                .rows()
                .into_iter()
                .map(|row| proto::Setting {
                    name: row.name,
                    value: row.value,
                    source: row.source,
                })
                .collect();
            info.kv_cache = model.engine.generator().map(|scheduler| {
                let kv = scheduler.kv_budget();
                let per_token = kv.bytes_per_token as u64;
                let used = kv.tokens_in_use() as u64;
                proto::KvCache {
                    bytes_per_token: per_token,
                    budget_tokens: kv.budget_tokens as u64,
                    budget_bytes: kv.budget_bytes() as u64,
                    used_tokens: used,
                    used_bytes: used * per_token,
                }
            });
        }
    }
    info
}

fn describe_graph(info: &mut proto::ModelVersion, graph: &GraphIo) {
    let tensor = |spec: &TensorSpec| proto::TensorInfo {
        name: spec.name.clone(),
        dtype: spec.dtype.clone(),
        shape: spec.shape.clone(),
    };
    info.inputs = graph.inputs.iter().map(tensor).collect();
    info.outputs = graph.outputs.iter().map(tensor).collect();
}

fn describe_manifest(info: &mut proto::ModelVersion, manifest: &Manifest) {
    info.family = match manifest.family {
        Family::Decoder => proto::Family::Decoder,
        Family::Rnn => proto::Family::Rnn,
        Family::Encoder => proto::Family::Encoder,
        Family::EncoderDecoder => proto::Family::EncoderDecoder,
    } as i32;
    info.tasks = manifest
        .tasks
        .iter()
        .map(|&task| task_to_proto(task))
        .collect();
    info.description = manifest.description.clone();
}

fn task_from_proto(value: i32) -> crate::error::Result<Task> {
    match proto::Task::try_from(value) {
        Ok(proto::Task::Generate) => Ok(Task::Generate),
        Ok(proto::Task::Embed) => Ok(Task::Embed),
        Ok(proto::Task::Classify) => Ok(Task::Classify),
        Ok(proto::Task::Unspecified) | Err(_) => Err(Error::invalid(
            "route.task",
            format!("must be TASK_GENERATE, TASK_EMBED or TASK_CLASSIFY; got {value}"),
        )),
    }
}

fn task_to_proto(task: Task) -> i32 {
    (match task {
        Task::Generate => proto::Task::Generate,
        Task::Embed => proto::Task::Embed,
        Task::Classify => proto::Task::Classify,
    }) as i32
}

/// The route a client sent, its sizes checked before anything else looks at it.
fn route_config(
    route: proto::Route,
    limits: &LimitsConfig,
) -> crate::error::Result<(String, RouteConfig)> {
    check_name("route.name", &route.name, limits)?;
    if route.arms.len() > limits.max_route_arms {
        return Err(Error::invalid(
            "route.arms",
            format!(
                "{} arms is over the limit of {} arms",
                route.arms.len(),
                limits.max_route_arms
            ),
        ));
    }
    for (index, arm) in route.arms.iter().enumerate() {
        check_target(&format!("route.arms[{index}].target"), &arm.target, limits)?;
    }
    if let Some(shadow) = &route.shadow {
        check_target("route.shadow.target", &shadow.target, limits)?;
    }
    let config = RouteConfig {
        task: task_from_proto(route.task)?,
        arms: route
            .arms
            .into_iter()
            .map(|arm| ArmConfig {
                target: arm.target,
                weight: arm.weight,
            })
            .collect(),
        shadow: route.shadow.map(|shadow| ShadowConfig {
            target: shadow.target,
            percent: shadow.percent,
        }),
    };
    Ok((route.name, config))
}

fn route_message(name: &str, entry: &RouteEntry) -> proto::Route {
    let route = &entry.route;
    proto::Route {
        source: match entry.source {
            RouteSource::Config => proto::RouteSource::Config,
            RouteSource::Api => proto::RouteSource::Api,
        } as i32,
        name: name.to_owned(),
        task: task_to_proto(route.task),
        arms: route
            .arms
            .iter()
            .map(|arm| proto::RouteArm {
                target: arm.target.clone(),
                weight: arm.weight,
            })
            .collect(),
        shadow: route.shadow.as_ref().map(|shadow| proto::ShadowArm {
            target: shadow.target.clone(),
            percent: shadow.percent,
        }),
    }
}
