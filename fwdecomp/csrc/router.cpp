// fwdecomp's compiled router: the no-tangent fast path of fwdecomp's autograd kernels.
//
// fwdecomp.autograd registers one Python kernel per operator and autograd dispatch key. That
// kernel costs 2-5 us per call even when no input carries a forward tangent (the dispatcher
// boxes the arguments into Python objects and back). A route puts this boxed C++ kernel in
// front of it: a call whose tensors carry no forward tangent goes straight to the kernel the
// dispatcher had before fwdecomp (PyTorch's own), every other call to fwdecomp's Python kernel,
// which decides exactly as without the router.
//
// A route is made in three steps around the Python registration (fwdecomp/router.py):
//   begin(name, overload, key)  remember the kernel computed for the key now (PyTorch's);
//   ...                          fwdecomp registers its Python kernel for the key;
//   finish(route)               register the router for the key, in front of both;
//   end(route)                  remove the router's registration (the Python one is removed by
//                               fwdecomp, after it).
// Only the C++ API of the dispatcher is used; no Python headers.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>

namespace {

// Forward AD keeps one level in PyTorch's autograd (torch.func nests through tensor wrappers,
// each with its own autograd metadata): a tangent is the forward gradient at level 0, which is
// what fwdecomp's Python kernel reads (forward_ad.unpack_dual at the current level, always 0).
bool carries_tangent(const c10::IValue& value) {
  if (value.isTensor()) {
    const at::Tensor& tensor = value.toTensor();
    return tensor.defined() && tensor._fw_grad(/*level=*/0).defined();
  }
  if (value.isList()) {  // Tensor[] and Tensor?[]
    for (const c10::IValue& element : value.toListRef()) {
      if (carries_tangent(element)) {
        return true;
      }
    }
  }
  return false;
}

struct Router final : c10::OperatorKernel {
  Router(c10::SafeKernelFunction original, c10::SafeKernelFunction routed, size_t arguments)
      : original_(std::move(original)), routed_(std::move(routed)), arguments_(arguments) {}

  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
    const size_t end = stack->size();
    for (size_t i = end - arguments_; i < end; ++i) {
      if (carries_tangent((*stack)[i])) {
        routed_.callBoxed(op, keys, stack);
        return;
      }
    }
    original_.callBoxed(op, keys, stack);
  }

 private:
  c10::SafeKernelFunction original_;  // PyTorch's kernel for the key, as computed before fwdecomp
  c10::SafeKernelFunction routed_;    // fwdecomp's Python kernel for the key
  size_t arguments_;
};

// Drops the dispatcher's "Overriding a previously registered kernel" warning (overriding is the
// point); passes every other warning on.
class QuietOverride final : public c10::WarningHandler {
 public:
  explicit QuietOverride(c10::WarningHandler* next) : next_(next) {}
  void process(const c10::Warning& warning) override {
    if (warning.msg().find("Overriding a previously registered kernel") == std::string::npos) {
      next_->process(warning);
    }
  }

 private:
  c10::WarningHandler* next_;
};

struct Route {
  c10::OperatorHandle op;
  c10::DispatchKey key;
  std::optional<c10::SafeKernelFunction> original;  // until finish()
  std::unique_ptr<torch::Library> library;          // after finish()
};

std::mutex routes_mutex;
// Never destroyed: a route still open at exit must not run kernel destructors after Python.
auto& routes = *new std::unordered_map<int64_t, Route>();
int64_t next_route = 1;

int64_t begin(const std::string& name, const std::string& overload, const std::string& key) {
  c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
  const c10::DispatchKey dispatch_key = c10::parseDispatchKey(key);
  TORCH_CHECK(!c10::isAliasDispatchKey(dispatch_key) && c10::isIncludedInAlias(dispatch_key, c10::DispatchKey::Autograd),
              "fwdecomp router: ", key, " is not a per-backend autograd dispatch key");
  Route route{op, dispatch_key, op.getComputedKernelForDispatchKey(dispatch_key), nullptr};
  std::lock_guard<std::mutex> guard(routes_mutex);
  const int64_t id = next_route++;
  routes.emplace(id, std::move(route));
  return id;
}

void finish(int64_t id) {
  std::lock_guard<std::mutex> guard(routes_mutex);
  auto found = routes.find(id);
  TORCH_CHECK(found != routes.end() && found->second.original.has_value(),
              "fwdecomp router: route ", id, " was not begun, or is finished");
  Route& route = found->second;
  const c10::FunctionSchema& schema = route.op.schema();
  const std::string& qualified = schema.name();
  const size_t colons = qualified.find("::");
  std::string name = qualified.substr(colons + 2);
  if (!schema.overload_name().empty()) {
    name += "." + schema.overload_name();
  }
  c10::SafeKernelFunction routed = route.op.getComputedKernelForDispatchKey(route.key);
  auto library = std::make_unique<torch::Library>(
      torch::Library::IMPL, qualified.substr(0, colons), route.key, __FILE__, __LINE__);
  QuietOverride quiet(c10::WarningUtils::get_warning_handler());
  c10::WarningUtils::WarningHandlerGuard quiet_guard(&quiet);
  library->impl(name.c_str(), torch::CppFunction::makeFromBoxedFunctor(std::make_unique<Router>(
                                  std::move(*route.original), std::move(routed), schema.arguments().size())));
  route.original.reset();
  route.library = std::move(library);
}

void end(int64_t id) {
  std::unique_ptr<torch::Library> library;
  {
    std::lock_guard<std::mutex> guard(routes_mutex);
    auto found = routes.find(id);
    if (found == routes.end()) {
      return;
    }
    library = std::move(found->second.library);
    routes.erase(found);
  }
  library.reset();  // removes the router's registration, outside the lock
}

int64_t open_routes() {
  std::lock_guard<std::mutex> guard(routes_mutex);
  return static_cast<int64_t>(routes.size());
}

}  // namespace

TORCH_LIBRARY(fwdecomp_router, m) {
  m.def("begin(str name, str overload, str key) -> int", &begin);
  m.def("finish(int route) -> ()", &finish);
  m.def("end(int route) -> ()", &end);
  m.def("open_routes() -> int", &open_routes);
}
