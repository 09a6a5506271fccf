//! `lmserve models …` and `lmserve routes …`: the Models service from the command line. Output is
//! one line per item, fields separated by two spaces, so it reads well and greps well.

use super::{Connection, Target, status};
use crate::api::proto::models_client::ModelsClient;
use crate::api::proto::{self, LoadState, RouteSource, Task};

async fn connect(target: &Target) -> anyhow::Result<ModelsClient<Connection>> {
    Ok(ModelsClient::new(target.connect().await?))
}

/// An enum value's proto name without its prefix, e.g. `LOAD_STATE_READY` -> `READY`.
fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_owned()
}

fn state_name(value: i32) -> String {
    LoadState::try_from(value).map_or(value.to_string(), |s| short(s.as_str_name(), "LOAD_STATE_"))
}

fn task_name(value: i32) -> String {
    Task::try_from(value).map_or(value.to_string(), |t| {
        short(t.as_str_name(), "TASK_").to_lowercase()
    })
}

fn tasks(version: &proto::ModelVersion) -> String {
    let names: Vec<String> = version.tasks.iter().map(|&t| task_name(t)).collect();
    if names.is_empty() {
        "-".into()
    } else {
        names.join(",")
    }
}

/// Every version of every model: `name@version  STATE  tasks  provider  [error]`.
pub async fn list_models(target: &Target) -> anyhow::Result<()> {
    let models = connect(target)
        .await?
        .list_models(proto::ListModelsRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .models;
    for model in models {
        for version in &model.versions {
            print_version_line(&model.name, version);
        }
    }
    Ok(())
}

fn print_version_line(name: &str, version: &proto::ModelVersion) {
    let provider = if version.execution_provider.is_empty() {
        "-"
    } else {
        &version.execution_provider
    };
    let mut line = format!(
        "{name}@{}  {}  {}  {provider}",
        version.version,
        state_name(version.state),
        tasks(version)
    );
    if !version.load_error.is_empty() {
        line.push_str("  ");
        line.push_str(&version.load_error);
    }
    println!("{line}");
}

/// One model ("name" or "name@version") in full: tensors, labels and effective settings.
pub async fn get_model(target: &Target, name: String) -> anyhow::Result<()> {
    let model = connect(target)
        .await?
        .get_model(proto::GetModelRequest { name })
        .await
        .map_err(status)?
        .into_inner();
    for version in &model.versions {
        print_version_line(&model.name, version);
        if !version.description.is_empty() {
            println!("  description  {}", version.description);
        }
        if version.max_length > 0 {
            println!("  max_length  {}", version.max_length);
        }
        for tensor in &version.inputs {
            println!(
                "  input  {}  {}  {:?}",
                tensor.name, tensor.dtype, tensor.shape
            );
        }
        for tensor in &version.outputs {
            println!(
                "  output  {}  {}  {:?}",
                tensor.name, tensor.dtype, tensor.shape
            );
        }
        if !version.labels.is_empty() {
            println!("  labels  {}", version.labels.join(","));
        }
        for setting in &version.settings {
            println!(
                "  setting  {} = {}  ({})",
                setting.name, setting.value, setting.source
            );
        }
    }
    Ok(())
}

/// Loads (or reloads) a model and prints its versions once the call returns.
pub async fn load_model(target: &Target, name: String, version: Option<u64>) -> anyhow::Result<()> {
    let model = connect(target)
        .await?
        .load_model(proto::LoadModelRequest { name, version })
        .await
        .map_err(status)?
        .into_inner();
    for version in &model.versions {
        print_version_line(&model.name, version);
    }
    Ok(())
}

/// Unloads a model (all its versions, or one) and prints the versions unloaded.
pub async fn unload_model(
    target: &Target,
    name: String,
    version: Option<u64>,
) -> anyhow::Result<()> {
    let unloaded = connect(target)
        .await?
        .unload_model(proto::UnloadModelRequest {
            name: name.clone(),
            version,
        })
        .await
        .map_err(status)?
        .into_inner();
    for version in unloaded.versions {
        println!("{name}@{version}  UNLOADED");
    }
    Ok(())
}

/// `name  task  arm=weight,…  [shadow target percent%]  source`.
fn print_route(route: &proto::Route) {
    let arms: Vec<String> = route
        .arms
        .iter()
        .map(|arm| format!("{}={}", arm.target, arm.weight))
        .collect();
    let shadow = route
        .shadow
        .as_ref()
        .map(|shadow| format!("  shadow {} {}%", shadow.target, shadow.percent))
        .unwrap_or_default();
    let source = RouteSource::try_from(route.source).map_or(route.source.to_string(), |s| {
        short(s.as_str_name(), "ROUTE_SOURCE_").to_lowercase()
    });
    println!(
        "{}  {}  {}{shadow}  {source}",
        route.name,
        task_name(route.task),
        arms.join(",")
    );
}

pub async fn list_routes(target: &Target) -> anyhow::Result<()> {
    let routes = connect(target)
        .await?
        .list_routes(proto::ListRoutesRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .routes;
    routes.iter().for_each(print_route);
    Ok(())
}

pub async fn get_route(target: &Target, name: String) -> anyhow::Result<()> {
    let route = connect(target)
        .await?
        .get_route(proto::GetRouteRequest { name })
        .await
        .map_err(status)?
        .into_inner();
    print_route(&route);
    Ok(())
}

/// A route as the command line gives it.
pub struct RouteSpec {
    pub name: String,
    /// "generate", "embed" or "classify".
    pub task: String,
    /// "target=weight" each.
    pub arms: Vec<String>,
    /// "target=percent".
    pub shadow: Option<String>,
}

impl RouteSpec {
    fn into_proto(self) -> anyhow::Result<proto::Route> {
        let task = Task::from_str_name(&format!("TASK_{}", self.task.to_uppercase()))
            .filter(|task| *task != Task::Unspecified)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "--task `{}` is not a task; use generate, embed or classify",
                    self.task
                )
            })?;
        let arms = self
            .arms
            .iter()
            .map(|arm| {
                let (target, weight) = split_number("--arm", arm)?;
                Ok(proto::RouteArm { target, weight })
            })
            .collect::<anyhow::Result<_>>()?;
        let shadow = self
            .shadow
            .map(|shadow| {
                let (target, percent) = split_number("--shadow", &shadow)?;
                Ok::<_, anyhow::Error>(proto::ShadowArm { target, percent })
            })
            .transpose()?;
        Ok(proto::Route {
            name: self.name,
            task: task as i32,
            arms,
            shadow,
            source: 0,
        })
    }
}

/// "target=number" -> (target, number), with an error naming the flag and the value.
fn split_number(flag: &str, value: &str) -> anyhow::Result<(String, f64)> {
    let (target, number) = value.rsplit_once('=').ok_or_else(|| {
        anyhow::anyhow!("{flag} `{value}` must be target=number, e.g. tiny-gpt2@1=90")
    })?;
    let number = number
        .parse()
        .map_err(|_| anyhow::anyhow!("{flag} `{value}`: `{number}` is not a number"))?;
    Ok((target.to_owned(), number))
}

pub async fn set_route(target: &Target, spec: RouteSpec) -> anyhow::Result<()> {
    let route = connect(target)
        .await?
        .set_route(proto::SetRouteRequest {
            route: Some(spec.into_proto()?),
        })
        .await
        .map_err(status)?
        .into_inner();
    print_route(&route);
    Ok(())
}

pub async fn delete_route(target: &Target, name: String) -> anyhow::Result<()> {
    connect(target)
        .await?
        .delete_route(proto::DeleteRouteRequest { name: name.clone() })
        .await
        .map_err(status)?;
    println!("{name}  deleted");
    Ok(())
}
