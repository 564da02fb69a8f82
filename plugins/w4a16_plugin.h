// TensorRT plugin (IPluginV3) for the qvggt::W4A16MatMul ONNX node: name "W4A16MatMul", namespace
// "qvggt", version "1". The same node contract as the Python plugin (qvggt_export/export/trt_plugin.py):
//   inputs  X fp16 [..., K], weight int8 kernel_v1 [N/8, K/128, 512], scales fp16 [K/128, N],
//           optional bias fp16 [N]
//   output  Y fp16 [..., N]
//   fields  K, N, group_size (128), bits (4) as kINT32; layout ("kernel_v1") as kCHAR
// Small M runs the fused kernel; large M dequantizes into the workspace and calls cublasGemmEx
// (w4a16_gemm.cuh decides which, for both plugins and the PyTorch binding).
#pragma once

#include "NvInferRuntime.h"

#include <cublas_v2.h>

#include <cstdint>
#include <string>
#include <vector>

namespace qvggt {

struct W4A16Attributes {
  int32_t k{0};
  int32_t n{0};
  int32_t groupSize{0};
  int32_t bits{0};
  std::string layout;
};

class W4A16MatMulPlugin final : public nvinfer1::IPluginV3,
                                public nvinfer1::IPluginV3OneCore,
                                public nvinfer1::IPluginV3OneBuild,
                                public nvinfer1::IPluginV3OneRuntime {
 public:
  explicit W4A16MatMulPlugin(W4A16Attributes attributes);
  W4A16MatMulPlugin(W4A16MatMulPlugin const&) = delete;
  W4A16MatMulPlugin& operator=(W4A16MatMulPlugin const&) = delete;
  ~W4A16MatMulPlugin() override;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override;
  char const* getPluginVersion() const noexcept override;
  char const* getPluginNamespace() const noexcept override;

  // IPluginV3OneBuild
  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                          int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override;
  int32_t getNbOutputs() const noexcept override;
  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

  // IPluginV3OneRuntime
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                        int32_t nbOutputs) noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

 private:
  W4A16Attributes mAttributes;
  std::vector<nvinfer1::PluginField> mSerializedFields;
  nvinfer1::PluginFieldCollection mSerializedCollection{};
  bool mHasBias{false};             // from configurePlugin / onShapeChange: enqueue is not told the input count
  cublasHandle_t mCublas{nullptr};  // the device's shared handle, taken in attachToContext
  int32_t mDevice{-1};
};

class W4A16MatMulPluginCreator final : public nvinfer1::IPluginCreatorV3One {
 public:
  W4A16MatMulPluginCreator();

  char const* getPluginName() const noexcept override;
  char const* getPluginVersion() const noexcept override;
  char const* getPluginNamespace() const noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
  nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;

 private:
  std::vector<nvinfer1::PluginField> mFieldNames;
  nvinfer1::PluginFieldCollection mFieldCollection{};
};

}  // namespace qvggt

// Entry points of a TensorRT 10 plugin library (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins).
extern "C" {
void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
// For applications that link the library: registers the creator under namespace "qvggt" once.
bool qvggtInitPlugins();
}
